"""The training data for the loop: one optimizer step (`StepBatch`) at a time, from the state's position."""
import queue
import threading

import torch
from torch.utils.data import DataLoader

from config import split_paths
from data_pipeline.batch import StepBatch, global_batch_size, steps_per_epoch
from data_pipeline.packed_text import PackedTextDataset, TextSpec, counts_dir_of
from data_pipeline.pairs import PairDataset
from data_pipeline.parquet import expand_paths
from data_pipeline.preference import PreferenceDataset, columns_of
from data_pipeline.span_corruption import corruption_of
from data_pipeline.token_counts import counts_paths
from data_pipeline.tokenize import shared_encoder
from data_pipeline.windows import StreamSpec
from training.signals import ignore_stop_signals


class DataFeed:
    """Builds the dataset of the objective for the batch settings in force (they change after out-of-memory
    recovery). A sample is a row (seq2seq), a chunk of packed text (span_corruption) or a pair (dpo)."""

    def __init__(self, cfg, tokenizer, runtime, rank: int, world_size: int, counts_files: list | None = None,
                 reference=None):
        """`counts_files`: for span corruption, the token counts' files as the main process names them;
        `reference`: for preference pairs, the run's `ReferenceLogps`."""
        self.cfg, self.tokenizer, self.runtime = cfg, tokenizer, runtime
        self.rank, self.world_size, self.counts_files = rank, world_size, counts_files
        self.reference = reference
        # The first build of a packed dataset counts the corpus's tokens on the main process (the others wait).
        first = self.dataset(batch_size=1, accumulation=1)
        self.num_samples = first.num_samples
        self.sample_name = first.sample_name
        self.description = first.describe()

    def dataset(self, batch_size: int, accumulation: int):
        cfg = self.cfg
        spec = StreamSpec(split_paths(cfg.train_file), cfg.max_seq_len, batch_size, cfg.dataloader_buffer_size,
                          cfg.seed, self.rank, self.world_size, self.runtime.ultra_low_mem, accumulation,
                          # Compiled: widths a multiple of 8 (few shapes; the memory-efficient attention kernel's
                          # alignment), also for span corruption's targets (44 tokens at 192).
                          pad_to_multiple_of=8 if cfg.compile else 1)
        if cfg.objective == "span_corruption":
            return PackedTextDataset(spec, self.tokenizer, TextSpec(
                cfg.text_column, corruption_of(cfg), counts_dir_of(cfg.output_dir), count_missing=self.rank == 0,
                counts_files=tuple(self.counts_files or ())))
        if cfg.objective == "dpo":
            return PreferenceDataset(spec, self.tokenizer, columns_of(cfg), self.reference.path("train"))
        return PairDataset(spec, self.tokenizer)

    def global_batch_size(self, state) -> int:
        return global_batch_size(state.batch_size_per_gpu, self.world_size, state.gradient_accumulation_steps)

    def steps_per_epoch(self, state) -> int:
        return steps_per_epoch(self.num_samples, self.global_batch_size(state))

    def total_steps(self, state, epochs: int) -> int:
        """Steps of the whole run: those done plus those left at the global batch in force (after a resume on
        another number of processes, the remaining rows are cut into steps of the new size)."""
        if state.epoch >= epochs:
            return state.global_step
        this_epoch = steps_per_epoch(self.num_samples - state.epoch_sample, self.global_batch_size(state))
        return state.global_step + this_epoch + (epochs - state.epoch - 1) * self.steps_per_epoch(state)

    def epoch_steps(self, state):
        """The remaining steps of `state.epoch`, starting right after `state.epoch_sample` global samples.

        A new epoch takes the current global batch size as its layout (the order of its rows); a begun epoch
        keeps the layout it started with, so a resume on another number of processes sees the same rows.
        """
        if state.epoch_sample >= self.num_samples:
            return  # the state was saved after the epoch's last step: nothing of it is left
        if state.epoch_sample == 0:
            state.layout_size = self.global_batch_size(state)
        dataset = self.dataset(state.batch_size_per_gpu, state.gradient_accumulation_steps)
        dataset.seek(state.epoch, state.epoch_sample, state.layout_size)
        # A private generator: starting an iterator draws a seed, and a draw from the global RNG would shift the
        # dropout masks of a resumed run away from those of the uninterrupted one.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.runtime.num_workers,
                            pin_memory=self.runtime.pin_memory, generator=torch.Generator(),
                            worker_init_fn=ignore_stop_signals)
        # Without workers (the 12 GB box) the steps are built one ahead in a thread, as workers would: the loop
        # then never waits for reading, tokenizing or padding (bench/bench_feed.py).
        steps = loader if self.runtime.num_workers else ahead_in_a_thread(loader)
        step: StepBatch
        for step in steps:
            yield step


def token_counts_files(cfg, tokenizer) -> list | None:
    """Span corruption: where a run keeps (or will write) its training files' token counts; None for seq2seq."""
    if cfg.objective != "span_corruption":
        return None
    return counts_paths(counts_dir_of(cfg.output_dir), expand_paths(split_paths(cfg.train_file)), cfg.text_column,
                        shared_encoder(tokenizer, None))


_END = object()


def ahead_in_a_thread(items, depth: int = 2):
    """Iterate `items` in a background thread that keeps up to `depth` of them ready; its error is raised here.

    An error (a data file that broke) is raised at the item where it happened, after the good ones: each rank
    stops at the step it could not build, as without the thread. Closing the generator (the loop leaving an epoch
    early) stops the thread after the item it is preparing, and waits for it; so does the interpreter's exit (the
    thread is not a daemon: one still inside the tokenizer or Arrow while the interpreter shuts down would abort
    the process). The positions travel inside the items, so preparing ahead changes nothing that is saved.
    """
    ready = queue.Queue(maxsize=depth)
    stop = threading.Event()
    main = threading.main_thread()
    # Pinning host memory (--pin_memory without workers) happens in this thread: on this rank's GPU, not GPU 0.
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def hand_over(item) -> bool:
        while not stop.is_set() and main.is_alive():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            hand_over(error)

    thread = threading.Thread(target=produce, name="step-builder")
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()

"""The training data for the loop: one optimizer step (`StepBatch`) at a time, from the state's position."""
import torch
from torch.utils.data import DataLoader

from config import split_paths
from model.dataset import LowMemParquetDataset, StepBatch, global_batch_size, steps_per_epoch
from training.signals import ignore_stop_signals


class DataFeed:
    """Builds the dataset for the batch settings in force (they change after out-of-memory recovery)."""

    def __init__(self, cfg, tokenizer, runtime, rank: int, world_size: int):
        self.cfg, self.tokenizer, self.runtime = cfg, tokenizer, runtime
        self.rank, self.world_size = rank, world_size
        self.num_rows = self.dataset(batch_size=1, accumulation=1).num_rows

    def dataset(self, batch_size: int, accumulation: int) -> LowMemParquetDataset:
        cfg = self.cfg
        return LowMemParquetDataset(
            split_paths(cfg.train_file), self.tokenizer, max_seq_len=cfg.max_seq_len, batch_size=batch_size,
            buffer_size=cfg.dataloader_buffer_size, seed=cfg.seed, rank=self.rank, world_size=self.world_size,
            ultra_low_mem=self.runtime.ultra_low_mem, gradient_accumulation_steps=accumulation, yield_steps=True,
            pad_to_multiple_of=8 if cfg.compile else 1)

    def global_batch_size(self, state) -> int:
        return global_batch_size(state.batch_size_per_gpu, self.world_size, state.gradient_accumulation_steps)

    def steps_per_epoch(self, state) -> int:
        return steps_per_epoch(self.num_rows, self.global_batch_size(state))

    def total_steps(self, state, epochs: int) -> int:
        """Steps of the whole run: those done plus those left at the global batch in force (after a resume on
        another number of processes, the remaining rows are cut into steps of the new size)."""
        if state.epoch >= epochs:
            return state.global_step
        this_epoch = steps_per_epoch(self.num_rows - state.epoch_sample, self.global_batch_size(state))
        return state.global_step + this_epoch + (epochs - state.epoch - 1) * self.steps_per_epoch(state)

    def epoch_steps(self, state):
        """The remaining steps of `state.epoch`, starting right after `state.epoch_sample` global samples.

        A new epoch takes the current global batch size as its layout (the order of its rows); a begun epoch
        keeps the layout it started with, so a resume on another number of processes sees the same rows.
        """
        if state.epoch_sample >= self.num_rows:
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
        step: StepBatch
        for step in loader:
            yield step

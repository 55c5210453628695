"""DPO's reference model without a second model in memory: the starting model's log-probabilities of every pair's
two answers, computed once in a pass before the first step and kept on disk.

The pass writes `<output_dir>/reference_logps/<key>/`, the key naming everything the numbers depend on (the data
files, the columns, the length they are truncated to, the precision, the starting model and the tokenizer), like
the token counts of span corruption: a new run on the same data and model reuses them, another model or file gets
its own. The training pairs are cut into parts of PART_PAIRS rows; the ranks take turns at the parts, each written
whole or not at all, so a pass stopped by a signal or a crash continues where it stopped when the same command runs
again. `train.npy` holds (chosen, rejected) for every row of the training files by row number (NaN for a pair that
is skipped), `valid.npy` those of the evaluation's pairs (in the evaluation's own batches), and `meta.json`, written
last, says the pass is complete.
A resume reads the directory its saved run names (run.json): the model it started from may be gone by then.
"""
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from accelerate.utils import gather_object

from config import split_paths
from data_pipeline.parquet import expand_paths, open_parquet, read_batches, read_footer
from data_pipeline.preference import EMPTY, SAME_ANSWERS, USABLE, columns_of, pair_verdicts
from data_pipeline.tokenize import shared_encoder, tokenize
from model.tokenizer import tokenizer_fingerprint
from training.evaluation import HalvingBatches, pair_logps
from training.resume import newest_state, read_run_description
from utils.atomic import save_array_atomically, write_json_atomically
from utils.distributed import decided_by_main, ranks_where
from utils.errors import UserError

log = logging.getLogger("trainer")
REFERENCE_DIR = "reference_logps"
PART_PAIRS = 256
PROGRESS_SECONDS = 30.0
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ReferenceLogps:
    """Where one run's reference log-probabilities live."""

    directory: str

    @property
    def key(self) -> str:
        return os.path.basename(self.directory)

    def path(self, split: str) -> str:
        return os.path.join(self.directory, f"{split}.npy")

    @property
    def meta_path(self) -> str:
        return os.path.join(self.directory, "meta.json")

    @property
    def complete(self) -> bool:
        return os.path.exists(self.meta_path)


def file_identity(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def reference_key(cfg, model_dir: str) -> str:
    """A name that changes with anything the reference log-probabilities depend on."""
    files = expand_paths(split_paths(cfg.train_file))
    if cfg.eval_max_samples:
        files += expand_paths(split_paths(cfg.validation_file))
    model = [file_identity(os.path.join(model_dir, name)) for name in MODEL_FILES
             if os.path.exists(os.path.join(model_dir, name))]
    identity = [*map(file_identity, files), *model, *columns_of(cfg), str(cfg.max_seq_len), str(cfg.eval_max_samples),
                cfg.mixed_precision, tokenizer_fingerprint(cfg.tokenizer_dir)]
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:24]


def reference_for_run(cfg, accelerator) -> ReferenceLogps:
    """A new run's reference (keyed by its starting model), or the one a resumed run was trained against."""
    root = os.path.join(cfg.output_dir, REFERENCE_DIR)
    if not cfg.is_keep_training:
        return ReferenceLogps(os.path.join(root, decided_by_main(accelerator, lambda: reference_key(cfg, cfg.init_from))))
    key = read_run_description(newest_state(accelerator, cfg.output_dir)).get("reference_logps")
    reference = ReferenceLogps(os.path.join(root, key or "none"))
    if not decided_by_main(accelerator, lambda: reference.complete):
        raise UserError(f"--is_keep_training=True: the saved run's reference log-probabilities ({reference.directory})"
                        " are gone; only the model the run started from can compute them: start a new run from it "
                        "(--init_from)")
    return reference


def file_parts(paths: list, columns, part_rows: int):
    """The rows of `paths`, in order, as tables of `part_rows` rows (the last one shorter)."""
    pending, rows = [], 0
    for path in paths:
        for batch in read_batches(open_parquet(path), path, columns):
            pending.append(batch)
            rows += batch.num_rows
            while rows >= part_rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, part_rows)
                pending, rows = table.slice(part_rows).to_batches(), rows - part_rows
    if rows:
        yield pa.Table.from_batches(pending)


class ReferencePass:
    def __init__(self, cfg, accelerator, tokenizer, reference: ReferenceLogps, evaluator):
        """`evaluator`: the run's `PreferenceEvaluator`, whose pairs and batches the validation figures use."""
        self.cfg, self.accelerator, self.reference, self.evaluator = cfg, accelerator, reference, evaluator
        self.columns = columns_of(cfg)
        self.encoder = shared_encoder(tokenizer, cfg.max_seq_len)
        self.pad_id = tokenizer.pad_token_id
        self.halving = HalvingBatches(cfg.eval_batch_size)

    def run(self, model, stop_requested) -> bool:
        """Make the reference complete: True when it is, False when a stop was asked for first (the parts done so
        far are kept). Every rank calls it."""
        if decided_by_main(self.accelerator, lambda: self.reference.complete):
            log.info("reference log-probabilities: reused from %s (%s)", self.reference.directory, self.summary())
            return True
        started = time.time()
        train_paths = expand_paths(split_paths(self.cfg.train_file))
        train_rows = sum(read_footer(path, self.columns).num_rows for path in train_paths)
        log.info("reference pass: the starting model's log-probabilities of %d training and %d validation pairs, "
                 "computed once (kept in %s)", train_rows, self.evaluator.total, self.reference.directory)
        parts = -(-train_rows // PART_PAIRS)
        if not self.compute_parts(model, file_parts(train_paths, self.columns, PART_PAIRS), parts, stop_requested):
            return False
        # The evaluation's pairs in the evaluation's own batches: the starting model then scores rewards of 0.
        valid = gather_object([(self.evaluator.indices, self.evaluator.answer_logps(model).cpu().numpy())])
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.merge(parts, valid)
        self.accelerator.wait_for_everyone()
        log.info("reference pass done in %.1fs (%s)", time.time() - started, self.summary())
        return True

    def part_path(self, index: int) -> str:
        return os.path.join(self.reference.directory, "parts-train", f"{index:06d}.npy")

    def compute_parts(self, model, parts, count: int, stop_requested) -> bool:
        """Rank r computes parts r, r + W, ... not on disk yet; after each round the ranks agree whether to stop."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        os.makedirs(os.path.dirname(self.part_path(0)), exist_ok=True)
        last_line = time.time()
        for first in range(0, count, world):
            mine = None
            for index in range(first, min(first + world, count)):
                table = next(parts)
                if index == first + rank:
                    mine = (index, table)
            if mine and not os.path.exists(self.part_path(mine[0])):
                save_array_atomically(self.part_path(mine[0]), self.part_logps(model, mine[1]))
            if ranks_where(self.accelerator, stop_requested()):
                log.warning("stopped by a signal during the reference pass: the parts computed so far are kept in "
                            "%s; run the same command again to continue it", self.reference.directory)
                return False
            if time.time() - last_line >= PROGRESS_SECONDS:
                log.info("reference pass: part %d of %d", min(first + world, count), count)
                last_line = time.time()
        return True

    def part_logps(self, model, table: pa.Table) -> np.ndarray:
        """(rows, 3): the chosen and rejected answers' log-probabilities and the pair's verdict (USABLE, ...)."""
        verdicts = pair_verdicts(table, self.columns)
        texts = [tokenize(self.encoder, pc.fill_null(table[name], "")) for name in self.columns]
        result = np.full((table.num_rows, 3), np.nan, dtype=np.float32)
        result[:, 2] = verdicts
        usable = np.flatnonzero(verdicts == USABLE)
        longest_answer = np.maximum(texts[1].lengths, texts[2].lengths)
        order = usable[np.argsort(texts[0].lengths[usable] + longest_answer[usable], kind="stable")]
        result[order, :2] = pair_logps(self.accelerator, model, self.halving, texts, order, self.pad_id).cpu().numpy()
        return result

    def merge(self, parts: int, valid: list) -> None:
        """The training parts into one array, the ranks' validation pairs into another, then meta.json, which marks
        the pass complete."""
        merged = np.concatenate([np.load(self.part_path(index)) for index in range(parts)])
        validation = np.zeros((self.evaluator.total, 2), dtype=np.float32)
        for indices, logps in valid:
            validation[indices] = logps
        for split, values in (("train", merged[:, :2]), ("valid", validation)):
            save_array_atomically(self.reference.path(split), np.ascontiguousarray(values))
        shutil.rmtree(os.path.dirname(self.part_path(0)), ignore_errors=True)
        verdicts = merged[:, 2]
        write_json_atomically(self.reference.meta_path, {
            "pairs": {"train": int((verdicts == USABLE).sum()), "valid": self.evaluator.total},
            "skipped_training_pairs": {"empty": int((verdicts == EMPTY).sum()),
                                       "same_answers": int((verdicts == SAME_ANSWERS).sum())}})

    def summary(self) -> str:
        with open(self.reference.meta_path, encoding="utf-8") as meta_file:
            meta = json.load(meta_file)
        skipped = meta["skipped_training_pairs"]
        return (f"{meta['pairs']['train']} training and {meta['pairs']['valid']} validation pairs; training pairs "
                f"skipped: {skipped['empty']} with an empty prompt or answer, {skipped['same_answers']} whose two "
                "answers are the same")

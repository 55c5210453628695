"""The best `keep_latest_n_ckp` models by BLEU-4 (span corruption: by the lowest eval loss; preference pairs: by the
highest reward accuracy, ties by the lowest eval loss), on disk under best/ and listed best first in
checkpoints.json, which names the metric that ranks them.

A model that falls out of the top k is deleted only once a state that no longer lists it is saved, so the newest
state's list always names models that exist.
"""
import logging
import math
import os
import shutil

from training.checkpoint import BEST_DIR, main_process_sees, save_hf_model, step_name
from utils.atomic import write_json_atomically

log = logging.getLogger("trainer")


HIGHER_IS_BETTER = {"bleu4": True, "eval_loss": False, "reward_accuracy": True}
# Which metric ranks each objective's models, and which decides between equal scores of it.
RANKING = {"seq2seq": ("bleu4", None), "span_corruption": ("eval_loss", None), "dpo": ("reward_accuracy", "eval_loss")}


class BestModels:
    """The top `keep` models by `metric` on disk, listed best first in checkpoints.json.

    Ties (in `metric`, and in `tie_break` when there is one) keep the earlier model: an equal score never displaces
    a model already in the top k.
    """

    def __init__(self, accelerator, output_dir: str, keep: int, tokenizer, metric: str = "bleu4",
                 tie_break: str | None = None):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.keep = keep
        self.tokenizer = tokenizer
        self.metric, self.tie_break = metric, tie_break

    def ranked(self, entries: list) -> list:
        def badness(entry, metric) -> float:  # a non-finite score (a diverged model's loss) ranks last
            sign = -1 if HIGHER_IS_BETTER[metric] else 1
            return sign * entry[metric] if math.isfinite(entry[metric]) else math.inf

        return sorted(entries, key=lambda e: (badness(e, self.metric),
                                              badness(e, self.tie_break) if self.tie_break else 0, e["step"]))

    def consider(self, model, state, score: float, tie_score: float | None = None) -> bool:
        """Save the model if it enters the top k by its `score` (the metric's value; `tie_score`: the tie-break's)
        and update `state.best`. Call on every rank; what falls out stays on disk until `sync_disk` after the state
        is saved."""
        candidate = {"path": f"{BEST_DIR}/{step_name(state.global_step)}", self.metric: score,
                     **({self.tie_break: tie_score} if self.tie_break else {}), "epoch": state.epoch,
                     "step": state.global_step}
        others = [e for e in state.best if e["step"] != state.global_step]
        best = self.ranked(others + [candidate])[: self.keep]
        entered = candidate in best
        if entered:
            save_hf_model(self.accelerator, model, self.tokenizer, os.path.join(self.output_dir, candidate["path"]))
        state.best = best
        return entered

    def restore(self, state) -> None:
        """After a resume: forget listed models whose directory is gone, then make the disk match the list."""
        missing = [e for e in state.best
                   if not main_process_sees(self.accelerator, os.path.join(self.output_dir, e["path"], "config.json"))]
        for entry in missing:
            log.warning("best model %s (%s %.4f) is listed in the saved state but missing on disk: forgotten",
                        entry["path"], self.metric, entry[self.metric])
        state.best = [e for e in state.best if e not in missing]
        self.sync_disk(state.best)

    def sync_disk(self, best: list) -> None:
        """Make checkpoints.json and best/ match `best` exactly (models newer than a resumed state go too)."""
        if self.accelerator.is_main_process:
            write_json_atomically(os.path.join(self.output_dir, "checkpoints.json"), {"metric": self.metric,
                                                                                      "best": best})
            root = os.path.join(self.output_dir, BEST_DIR)
            kept = {os.path.basename(e["path"]) for e in best}
            for name in os.listdir(root) if os.path.isdir(root) else []:
                if name not in kept:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()

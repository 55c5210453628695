"""Resumable state and `final/`, written so that a crash at any instant loses nothing (best models: see
`training.best_models`).

Layout under `output_dir`:
    state/step-00001234/   Accelerate's save_state (model, optimizer, every rank's RNG states, TrainingState)
                           plus run.json and the COMPLETE marker, written last
    best/step-00001234/    Hugging Face model + tokenizer, the top `keep_latest_n_ckp` by BLEU-4 (span corruption:
                           by eval loss)
    checkpoints.json       {"metric": "bleu4" or "eval_loss", "best": [...]}, best first
    final/                 the model at the end of every invocation

Every directory is written under a temporary name, fsynced, then renamed: a reader never sees half of one. A
best model that falls out of the top k is deleted only once a state that no longer lists it is saved, so the
newest state's list always names models that exist. `output_dir` must be one directory every rank sees (a shared
filesystem across machines): each rank writes its own random states into the state directory.
"""
import json
import logging
import os
import shutil

from utils.atomic import TMP_PREFIX, fsync_tree, replace_directory
from utils.distributed import decided_by_main

STATE_DIR, BEST_DIR, FINAL_DIR = "state", "best", "final"
COMPLETE_MARKER = "COMPLETE"
log = logging.getLogger("trainer")


def main_process_sees(accelerator, path: str) -> bool:
    """Whether the main process sees `path`: the same answer on every rank, so they all take the same branch."""
    return decided_by_main(accelerator, lambda: os.path.exists(path))


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def state_name(state) -> str:
    """Unique per data position: the end-of-epoch state differs from the one saved at the same step before it."""
    return f"{step_name(state.global_step)}-epoch-{state.epoch:04d}-{state.epoch_sample:012d}"


def complete_states(output_dir: str) -> list[str]:
    """Complete state directories, oldest first; temporary or unmarked ones (a crash mid-write) are ignored."""
    root = os.path.join(output_dir, STATE_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    return [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n, COMPLETE_MARKER))]


def save_hf_model(accelerator, model, tokenizer, target: str) -> None:
    """`save_pretrained` (safetensors) + tokenizer into `target`, atomically. Call on every rank."""
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP/DeepSpeed: every rank takes part
    if accelerator.is_main_process:
        tmp = os.path.join(os.path.dirname(target), TMP_PREFIX + os.path.basename(target))
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_directory(tmp, target)
    accelerator.wait_for_everyone()


class Checkpointer:
    """Saves and finds resumable training state; decides itself when a save is due."""

    def __init__(self, accelerator, output_dir: str, save_steps: int, run_description: dict):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.save_steps = save_steps
        self.run_description = run_description
        self.last_saved = None  # name of the state this invocation wrote last

    def due(self, step: int) -> bool:
        return step % self.save_steps == 0

    def save(self, state) -> bool:
        """Write `state` and the model, optimizer, scheduler and RNGs (all ranks); keep only the newest.

        False when this data position is saved already (its state is kept as it is)."""
        name = state_name(state)
        root = os.path.join(self.output_dir, STATE_DIR)
        final = os.path.join(root, name)
        tmp = os.path.join(root, TMP_PREFIX + name)
        # The same position was saved already (e.g. a resume of a finished run): never swap out a good state.
        if self.last_saved == name or main_process_sees(self.accelerator, os.path.join(final, COMPLETE_MARKER)):
            self.last_saved = name
            return False
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(tmp)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with open(os.path.join(tmp, "run.json"), "w", encoding="utf-8") as out:
                json.dump(self.run_description, out, indent=2, ensure_ascii=False)
            fsync_tree(tmp)
            with open(os.path.join(tmp, COMPLETE_MARKER), "w") as marker:
                marker.write(str(state.global_step))
                os.fsync(marker.fileno())
            replace_directory(tmp, final)
            self._remove_all_but(final)
        self.accelerator.wait_for_everyone()
        self.last_saved = name
        log.info("saved resumable state at step %d: %s", state.global_step, final)
        return True

    def _remove_all_but(self, keep: str) -> None:
        root = os.path.dirname(keep)
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str) -> None:
        """Restore model, optimizer, scheduler, every rank's RNG states and the TrainingState."""
        self.accelerator.load_state(path)
        self.last_saved = os.path.basename(path)

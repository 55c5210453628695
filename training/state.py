"""The training state: every counter of a run lives here (never in the config) and is saved with the checkpoint."""
import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainingState:
    """Where a run is. Accelerate saves it with the model (`register_for_checkpointing`) so resume is exact."""

    global_step: int = 0
    """Optimizer steps done (skipped non-finite steps included: their data was consumed)."""
    epoch: int = 0
    """Epoch in progress."""
    epoch_sample: int = 0
    """Global samples of this epoch consumed: the data position, independent of the number of processes."""
    epoch_samples: int = 0
    """Samples (rows; chunks of packed text) per epoch: a resume on other data would misread the position."""
    layout_size: int = 0
    """Global batch size when this epoch started; fixes the epoch's data order (see model/dataset.py)."""
    batch_size_per_gpu: int = 0
    """Micro-batch size in force (halved by out-of-memory recovery)."""
    gradient_accumulation_steps: int = 0
    """Accumulation in force (doubled by out-of-memory recovery)."""
    world_size: int = 1
    """Processes of the run that wrote this state; a resume on another count warns."""
    samples_seen: int = 0
    """Global samples consumed over the whole run."""
    consecutive_bad_steps: int = 0
    """Non-finite steps in a row; the run stops at `max_bad_steps`."""
    bad_steps_total: int = 0
    """Non-finite steps skipped over the whole run."""
    skipped_rows: int = 0
    """Rows dropped for an empty prompt or response."""
    schedule_total_steps: int = 0
    """The run length the learning-rate schedule aims at; a resume that changes it re-aims the decay."""
    decay_anchor: list = field(default_factory=list)
    """[step, progress] the cosine decay goes on from after a re-aim; empty: from the end of the warmup."""
    milestone_due: bool = False
    """An evaluation and save fell due on a non-finite step: they happen after the next finite one."""
    milestone_step: int = -1
    """Step of the last evaluation and save, so an epoch ending right after one does not repeat it."""
    best: list = field(default_factory=list)
    """Best models, best first: dicts with path, epoch, step and the ranking metric (bleu4, or eval_loss)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        for name, value in saved.items():
            if hasattr(self, name):
                setattr(self, name, value)


"""The real CLI with the GPU allocator capped, so that a large card behaves like a small one.

    python bench/capped_cli.py CAP_GIB COMMAND --flags...      e.g. 8 train --use_large_config=True ...

Past CAP_GIB of GPU memory the allocator raises OutOfMemoryError as a full 20 GB (or 8 GB) card would; without
CUDA, or with CAP_GIB 0, it is `train_low_mem.py` itself. `bench/gpu_check.py` runs its end-to-end checks through it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_low_mem  # noqa: E402
from commands.cli import main  # noqa: E402
from gpu_bench import cap_memory  # noqa: E402
from training.runtime import set_cuda_defaults  # noqa: E402

if __name__ == "__main__":
    set_cuda_defaults()  # the allocator's settings are read when CUDA starts, which the cap does
    cap_memory(float(sys.argv.pop(1)))
    main(train_low_mem.COMMANDS)

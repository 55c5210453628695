#!/usr/bin/env bash
# The pure-Python wheels the project needs beyond what GPU images usually carry (torch, transformers, accelerate,
# pyarrow, numpy, psutil, tqdm, safetensors, tokenizers): download them here, on a machine with a package index,
# copy DIR to the GPU box, and `bash bench/gpu_check.sh --wheels DIR` installs them there without network.
#   bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]      (the GPU box's Python, default 3.12)
set -euo pipefail
dir="${1:?usage: bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]}"
python_version="${2:-3.12}"
mkdir -p "$dir"
# The versions requirements.txt accepts; each of these is a py3-none-any wheel, whatever the box's platform.
python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$python_version" --dest "$dir" "fire>=0.6" termcolor "nltk>=3.8"
ls -l "$dir"
du -sh "$dir"

"""Files and directories that appear whole or not at all: a crash at any instant leaves the old version or the
new one, never half of either. Everything is written under a temporary name, flushed to disk, then renamed."""
import json
import os
import shutil

TMP_PREFIX = "tmp-"


def fsync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: str) -> None:
    """Flush every file and directory under `path` to disk, so a rename after it publishes complete data."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomically(path: str, payload) -> None:
    write_text_atomically(path, json.dumps(payload, ensure_ascii=False, indent=2))


def save_array_atomically(path: str, array) -> None:
    """A numpy array as a .npy file at `path`, whole or not at all."""
    import numpy as np

    tmp = f"{path}.tmp.npy"  # (np.save appends .npy to a name without it)
    with open(tmp, "wb") as out:
        np.save(out, array)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_directory(tmp: str, final: str) -> None:
    """Atomically replace `final` by the complete directory `tmp` (the old one survives until the swap)."""
    fsync_tree(tmp)
    old = None
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), f"{TMP_PREFIX}old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    if old:
        shutil.rmtree(old, ignore_errors=True)

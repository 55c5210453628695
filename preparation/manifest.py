"""Resumable phases: a manifest in the work directory records each finished phase and its result.

A phase writes only inside its own directory and is recorded only once it is complete, so a run killed at any
instant resumes at the first unrecorded phase (whose directory is cleared first). The manifest names the
fingerprint of the flags and inputs it belongs to: a re-run with other flags or changed inputs starts over.
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict

from utils.atomic import write_json_atomically

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
"""Changes whenever a change of this code would change the output of the same flags."""
UNFINGERPRINTED_FLAGS = ("output_dir", "overwrite")


def library_versions(flags) -> dict:
    """Libraries whose version decides the output bytes."""
    from importlib.metadata import PackageNotFoundError, version

    wanted = ["pyarrow"] + (["rensa"] if flags.dedup == "near" else []) \
        + (["opencc"] if flags.traditional_to_simplified else [])
    versions = {}
    for name in wanted:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(flags, paths: list[str], exclude=()) -> dict:
    """What the output depends on: the flags that shape it (less `exclude`), each input's size and modification
    time, the versions of the libraries that decide its bytes."""
    settings = {name: value for name, value in asdict(flags).items()
                if name not in UNFINGERPRINTED_FLAGS and name not in exclude}
    inputs = [{"path": path, "bytes": os.path.getsize(path), "mtime_ns": os.stat(path).st_mtime_ns}
              for path in paths]
    described = {"format_version": FORMAT_VERSION, "flags": settings, "inputs": inputs,
                 "libraries": library_versions(flags)}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": digest, **described}


class Manifest:
    def __init__(self, work_dir: str, print_fn=print):
        self.work_dir, self.path = work_dir, os.path.join(work_dir, MANIFEST_FILE)
        self.print = print_fn
        self.data = None

    def open(self, expected: dict) -> list[str]:
        """Resume the work directory's phases when they belong to `expected`, else clear it. Returns the phases
        already done."""
        previous = None
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as handle:
                    previous = json.load(handle)
            except (OSError, json.JSONDecodeError):
                previous = None
        if previous and previous.get("fingerprint", {}).get("id") == expected["id"]:
            self.data = previous
            return list(previous["phases"])
        if os.path.isdir(self.work_dir):
            self.print(f"starting over: {self.work_dir} holds an unfinished run of other flags or inputs (or one "
                       "stopped before its first phase)")
            shutil.rmtree(self.work_dir)
        os.makedirs(self.work_dir)
        self.data = {"fingerprint": expected, "phases": {}}
        write_json_atomically(self.path, self.data)
        return []

    def result(self, phase: str):
        return self.data["phases"].get(phase)

    def phase_dir(self, phase: str, fresh: bool) -> str:
        directory = os.path.join(self.work_dir, phase)
        if fresh and os.path.isdir(directory):
            shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)
        return directory

    def record(self, phase: str, result: dict) -> None:
        self.data["phases"][phase] = result
        write_json_atomically(self.path, self.data)

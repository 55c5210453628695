"""`prepare`'s phases in order, each skipped when the manifest records it done, then the outputs published.

Publishing moves the finished files into --output_dir and writes `prepare_report.json` last: until it exists the
directory is not a prepared directory (see `layout`), so a run killed at any instant never leaves outputs that look
finished, and the same command resumes it.
"""
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
from tqdm import tqdm

from preparation import candidates as pairs_step
from preparation import clusters as cluster_step
from preparation import exact, layout, report, signature_phase, split
from preparation.clean_phase import CleanResult, mapping_of, run_clean, spill_rows
from preparation.columns import OUTPUT_COLUMNS
from preparation.disk import check_free_space, input_estimate, plan_disk
from preparation.formats import source_of
from preparation.manifest import Manifest, fingerprint
from preparation.minhash import estimated_jaccard, optimal_banding
from utils.atomic import write_json_atomically
from utils.errors import UserError, UserErrors

SPILL_FILE = "rows.parquet"
SPLIT_FLAGS = ("valid_rows", "valid_fraction")
"""Flags only the split depends on: changing them after a failed run redoes the split, not the deduplication."""


def bar(step: int, name: str, total, unit: str):
    return tqdm(total=total, desc=f"[{step}/6] {name}", unit=unit, unit_scale=True, mininterval=1.0,
                dynamic_ncols=True, leave=True)


class Preparation:
    def __init__(self, flags, paths: list[str], output_dir: str, print_fn=print):
        self.flags, self.paths, self.output_dir, self.print = flags, paths, output_dir, print_fn
        self.columns = OUTPUT_COLUMNS[flags.objective]
        self.banding = optimal_banding(flags.dedup_threshold, flags.num_perm)
        self.work_dir = os.path.join(output_dir, layout.WORK_DIR)
        self.manifest = Manifest(self.work_dir, print_fn)
        self.timings = {}

    # -- the steps ---------------------------------------------------------------------------------------------
    def inspect_inputs(self):
        """Every input's format and column mapping, every problem at once, before any work."""
        problems, sources, mappings = [], [], []
        for path in self.paths:
            try:
                source = source_of(path, self.flags.format)
                mappings.append(mapping_of(source, self.flags))
                sources.append(source)
            except UserError as error:
                problems.extend(error.problems if isinstance(error, UserErrors) else [str(error)])
        if problems:
            raise UserErrors(problems)
        self.sources, self.mappings = sources, mappings

    def run(self) -> dict:
        self.inspect_inputs()
        expected = fingerprint(self.flags, self.paths, exclude=SPLIT_FLAGS)
        done = self.manifest.open(expected)
        if done:
            self.print(f"resuming in {self.work_dir}: done already: {', '.join(done)}")
        parquet_rows = {s.path: self.parquet_size(s.path) for s in self.sources if s.format == "parquet"}
        rows, text_bytes = input_estimate(self.sources, parquet_rows)
        self.print("estimated " + plan_disk(rows, text_bytes, self.flags, self.banding.bands).describe())

        cleaned = self.phase("clean", self.clean)
        read = CleanResult(**{**cleaned["read"], "bad_rows_by_file": Counter(cleaned["read"]["bad_rows_by_file"])})
        self.check_not_empty(read)
        disk = plan_disk(read.rows_out, cleaned["text_bytes"], self.flags, self.banding.bands)
        self.print(disk.describe())
        check_free_space(disk, self.work_dir, "--output_dir")
        exact_result = self.phase("exact", self.exact)
        near = None
        if self.flags.dedup == "near":
            self.phase("signatures", self.signatures)
            self.phase("candidates", self.candidates)
            shutil.rmtree(os.path.join(self.work_dir, "signatures", signature_phase.BAND_DIR), ignore_errors=True)
            near = self.phase("clusters", self.clusters)
            shutil.rmtree(os.path.join(self.work_dir, "candidates"), ignore_errors=True)
            shutil.rmtree(os.path.join(self.work_dir, "signatures"), ignore_errors=True)
        split_settings = {name: getattr(self.flags, name) for name in SPLIT_FLAGS}
        previous = self.manifest.result("split")
        if previous and previous["settings"] != split_settings:
            del self.manifest.data["phases"]["split"]
        written = self.phase("split", self.split)
        return self.publish(read, cleaned, exact_result, near, written)

    def phase(self, name: str, work):
        recorded = self.manifest.result(name)
        if recorded is not None:
            return recorded
        started = time.monotonic()
        result = work(self.manifest.phase_dir(name, fresh=True))
        result["seconds"] = round(time.monotonic() - started, 1)
        self.manifest.record(name, result)
        return result

    @staticmethod
    def parquet_size(path: str) -> tuple[int, int]:
        import pyarrow.parquet as pq

        metadata = pq.ParquetFile(path).metadata
        return metadata.num_rows, sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))

    def spill(self) -> str:
        return os.path.join(self.work_dir, "clean", SPILL_FILE)

    def clean(self, directory: str) -> dict:
        with bar(1, "read and clean", sum(s.size for s in self.sources), "B") as progress:
            result = run_clean(self.sources, self.mappings, self.flags, os.path.join(directory, SPILL_FILE),
                               progress)
        text_bytes = os.path.getsize(os.path.join(directory, SPILL_FILE)) * 2
        return {"read": {**asdict(result), "bad_rows_by_file": dict(result.bad_rows_by_file)},
                "text_bytes": text_bytes}

    def check_not_empty(self, read: CleanResult) -> None:
        inputs = f"--input={self.flags.input}"
        if read.rows_read == 0:
            example = read.bad_row_examples[0] if read.bad_row_examples else None
            raise UserError(f"{inputs}: no row could be read from {', '.join(self.paths)}"
                            + (f" ({read.bad_rows} bad rows, e.g. {example['file']}:{example['line']}: "
                               f"{example['reason']}); check --format and the column flags" if example else
                               " (the files are empty); give files with rows"))
        if read.rows_out == 0:
            dropped = ", ".join(f"{rule} {count}" for rule, count in read.cleaning["dropped"].items() if count)
            raise UserError(f"{inputs}: no row of {', '.join(self.paths)} is left after cleaning ({read.rows_read} "
                            f"read; dropped: {dropped}); loosen --min_chars, --max_chars or --min_cjk_share, or "
                            "check the column flags")

    def exact(self, directory: str) -> dict:
        rows = self.manifest.result("clean")["read"]["rows_out"]
        if self.flags.dedup == "none":
            keep, groups = np.ones(rows, dtype=bool), 0
        else:
            with bar(2, "exact duplicates", rows, "rows") as progress:
                keep, groups = exact.first_copies(exact.row_digests(self.spill(), self.columns, rows, progress))
        np.save(os.path.join(directory, "keep.npy"), keep)
        return {"dropped": int(rows - keep.sum()), "groups": groups}

    def exact_keep(self) -> np.ndarray:
        return np.load(os.path.join(self.work_dir, "exact", "keep.npy"))

    def signatures(self, directory: str) -> dict:
        keep = self.exact_keep()
        os.makedirs(os.path.join(directory, signature_phase.BAND_DIR))
        with bar(3, "MinHash signatures", len(keep), "rows") as progress:
            signed = signature_phase.write_signatures(self.spill(), self.columns, keep, self.flags, self.banding,
                                                      directory, progress)
        return {"signed": signed}

    def candidates(self, directory: str) -> dict:
        band_dir = os.path.join(self.work_dir, "signatures", signature_phase.BAND_DIR)
        with bar(4, "sort band keys", self.banding.bands * signature_phase.PARTITIONS, "part") as progress:
            written = pairs_step.write_candidate_pairs(band_dir, self.banding.bands, directory, progress)
        return {"pairs_written": written}

    def clusters(self, directory: str) -> dict:
        signed = self.manifest.result("signatures")["signed"]
        signature_dir = os.path.join(self.work_dir, "signatures")
        with bar(5, "verify pairs", pairs_step.PAIR_PARTITIONS, "part") as progress:
            first, second, candidates = cluster_step.verified_edges(
                os.path.join(self.work_dir, "candidates"), signature_dir, self.flags.num_perm,
                self.flags.dedup_threshold, progress)
        found = cluster_step.cluster(first, second, signed, candidates)
        exact_keep = self.exact_keep()
        signed_rows = np.flatnonzero(exact_keep)
        keep = exact_keep.copy()
        keep[signed_rows[found.drop]] = False
        np.save(os.path.join(directory, "keep.npy"), keep)
        return {"dropped": int(found.drop.sum()), "clusters": found.clusters, "candidate_pairs": candidates,
                "verified_pairs": found.verified_pairs,
                "examples": self.examples(found, signed_rows, signature_dir)}

    def examples(self, found, signed_rows: np.ndarray, signature_dir: str) -> list:
        """The first removed near duplicates, each with the row it duplicates and their estimated Jaccard."""
        removed = np.flatnonzero(found.drop)[: self.flags.examples]
        if len(removed) == 0:
            return []
        kept = found.representative[removed]
        similarity = estimated_jaccard(signature_phase.read_signatures(signature_dir, self.flags.num_perm, kept),
                                       signature_phase.read_signatures(signature_dir, self.flags.num_perm, removed))
        wanted = list(self.columns) + ["source", "line"]
        rows = spill_rows(self.spill(), np.concatenate([signed_rows[kept], signed_rows[removed]]), wanted)
        described = []
        for kept_id, removed_id, jaccard in zip(signed_rows[kept], signed_rows[removed], similarity):
            described.append({"estimated_jaccard": round(float(jaccard), 3),
                              "kept": self.example_row(rows[int(kept_id)]),
                              "removed": self.example_row(rows[int(removed_id)])})
        return described

    def example_row(self, row: dict) -> dict:
        return {"file": self.paths[row["source"]], "line": row["line"],
                **{name: row[name] for name in self.columns}}

    def final_keep(self) -> np.ndarray:
        if self.flags.dedup == "near":
            return np.load(os.path.join(self.work_dir, "clusters", "keep.npy"))
        return self.exact_keep()

    def valid_rows(self, kept: int) -> int:
        flags = self.flags
        if flags.valid_fraction > 0:
            wanted, flag = int(round(flags.valid_fraction * kept)), f"--valid_fraction={flags.valid_fraction}"
        else:
            wanted, flag = flags.valid_rows, f"--valid_rows={flags.valid_rows}"
        if wanted >= kept:
            raise UserError(f"{flag}: {kept:,} rows remain after cleaning and deduplication, so no training row "
                            "would be left; lower it")
        return wanted

    def split(self, directory: str) -> dict:
        keep = self.final_keep()
        kept = int(keep.sum())
        valid_rows = self.valid_rows(kept)
        positions = split.output_positions(kept, self.flags.seed)
        bucket_dir = os.path.join(directory, "buckets")
        os.makedirs(bucket_dir)
        with bar(6, "shuffle and split", len(keep), "rows") as progress:
            buckets = split.scatter(self.spill(), self.columns, keep, positions, bucket_dir, progress)
        outputs = {"train": os.path.join(directory, layout.TRAIN_FILE)}
        if valid_rows:
            outputs["valid"] = os.path.join(directory, layout.VALID_FILE)
        with bar(6, "write outputs", buckets, "bucket") as progress:
            result = split.gather(bucket_dir, buckets, self.columns, valid_rows, outputs, progress)
        shutil.rmtree(bucket_dir)
        np.savez(os.path.join(directory, "lengths.npz"),
                 **{f"{name}/{column}": lengths for name, by_column in result.lengths.items()
                    for column, lengths in by_column.items()})
        return {"rows": result.rows, "settings": {name: getattr(self.flags, name) for name in SPLIT_FLAGS}}

    # -- publishing ---------------------------------------------------------------------------------------------
    def publish(self, read: CleanResult, cleaned: dict, exact_result: dict, near: dict | None, written: dict) -> dict:
        """Histograms, then the outputs moved into place, then the report (last), then the work directory gone.
        Safe to repeat after an interruption: files already moved are not moved again."""
        split_dir = os.path.join(self.work_dir, "split")
        with np.load(os.path.join(split_dir, "lengths.npz")) as saved:
            lengths = {name: {column: saved[f"{name}/{column}"] for column in self.columns}
                       for name in written["rows"]}
        for name, by_column in lengths.items():
            report.draw_histogram(os.path.join(split_dir, layout.HISTOGRAM_FILES[name]), name, by_column)
        summary = self.report(read, exact_result, near, written, lengths)
        report_path = os.path.join(self.output_dir, layout.REPORT_FILE)
        if os.path.exists(report_path):
            os.remove(report_path)
        produced = [layout.SPLIT_FILES[name] for name in written["rows"]] + \
                   [layout.HISTOGRAM_FILES[name] for name in written["rows"]]
        stale = [name for name in (*layout.SPLIT_FILES.values(), *layout.HISTOGRAM_FILES.values())
                 if name not in produced]
        for name in stale:
            if os.path.exists(os.path.join(self.output_dir, name)):
                os.remove(os.path.join(self.output_dir, name))
        for name in produced:
            if os.path.exists(os.path.join(split_dir, name)):
                os.replace(os.path.join(split_dir, name), os.path.join(self.output_dir, name))
        write_json_atomically(report_path, summary)
        shutil.rmtree(self.work_dir)
        for line in report.rule_lines(summary):
            self.print(line)
        self.print(f"prepared {self.output_dir}: {', '.join(produced[:len(written['rows'])])}, "
                   f"{layout.REPORT_FILE} (use --train_file={self.output_dir}"
                   + (f" --validation_file={self.output_dir}" if "valid" in written["rows"] else "") + ")")
        return summary

    def report(self, read: CleanResult, exact_result: dict, near: dict | None, written: dict, lengths: dict) -> dict:
        flags = self.flags
        dedup = {"mode": flags.dedup, "exact_dropped": exact_result["dropped"],
                 "exact_clusters": exact_result["groups"]}
        if near is not None:
            dedup.update(threshold=flags.dedup_threshold, ngram=flags.dedup_ngram, num_perm=flags.num_perm,
                         bands=self.banding.bands, rows_per_band=self.banding.rows, library="rensa (RMinHash)",
                         near_dropped=near["dropped"], near_clusters=near["clusters"],
                         candidate_pairs=near["candidate_pairs"], verified_pairs=near["verified_pairs"],
                         examples=near["examples"])
        phases = self.manifest.data["phases"]
        return {
            "fingerprint": fingerprint(flags, self.paths),
            "flags": asdict(flags),
            "inputs": read.files,
            "read": {"rows": read.rows_read, "bad_rows": read.bad_rows,
                     "bad_rows_by_file": dict(read.bad_rows_by_file), "bad_row_examples": read.bad_row_examples},
            "rules": report.rule_states(flags),
            "cleaning": read.cleaning,
            "rows_after_cleaning": read.rows_out,
            "dedup": dedup,
            "rows_out": written["rows"],
            "columns": list(self.columns),
            "row_group_rows": split.ROW_GROUP_ROWS,
            "files": {name: layout.SPLIT_FILES[name] for name in written["rows"]},
            "histograms": {name: layout.HISTOGRAM_FILES[name] for name in written["rows"]},
            "lengths": {name: {column: report.length_summary(values) for column, values in by_column.items()}
                        for name, by_column in lengths.items()},
            "seconds": {name: phase.get("seconds") for name, phase in phases.items()},
        }

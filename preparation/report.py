"""What `prepare` tells: a log line per rule and phase, `prepare_report.json`, and PNG length histograms.

The histograms are drawn with matplotlib's object API (no pyplot state, no display), like `plot`'s charts.
"""
import numpy as np

from preparation.cleaning import DROPPING_RULES, REWRITING_RULES

HISTOGRAM_BINS = 60


def length_summary(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"rows": 0}
    percentiles = np.percentile(lengths, [50, 90, 99])
    return {"rows": int(len(lengths)), "mean": round(float(lengths.mean()), 1), "min": int(lengths.min()),
            "median": int(percentiles[0]), "p90": int(percentiles[1]), "p99": int(percentiles[2]),
            "max": int(lengths.max())}


def draw_histogram(path: str, split: str, lengths_by_column: dict) -> None:
    """One PNG per split: the distribution of characters per row of each column (log-spaced bins, since row
    lengths span orders of magnitude)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.8), layout="constrained")
    axes = figure.subplots()
    longest = max((int(lengths.max()) for lengths in lengths_by_column.values() if len(lengths)), default=1)
    bins = np.unique(np.geomspace(1, max(longest, 2) + 1, HISTOGRAM_BINS).astype(int))
    for column, lengths in lengths_by_column.items():
        if len(lengths):
            axes.hist(np.maximum(lengths, 1), bins=bins, histtype="step", linewidth=1.5,
                      label=f"{column} (median {int(np.median(lengths))})")
    axes.set_xscale("log")
    axes.set(title=f"Characters per row, {split} split", xlabel="characters", ylabel="rows")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=110)


def rule_lines(report: dict) -> list[str]:
    """The log: rows in, then one line per rule, per deduplication step and per split."""
    read = report["read"]
    lines = [f"read {read['rows']:,} rows from {len(report['inputs'])} file(s); {read['bad_rows']:,} could not be "
             "parsed" + ("" if not read["bad_rows"] else
                         " (e.g. " + "; ".join(f"{bad['file']}:{bad['line']}: {bad['reason']}"
                                               for bad in read["bad_row_examples"][:3]) + ")")]
    cleaning = report["cleaning"]
    for rule in REWRITING_RULES:
        state = report["rules"][rule]
        lines.append(f"rule {rule} ({state}): changed {cleaning['changed'][rule]:,} rows")
    for rule in DROPPING_RULES:
        state = report["rules"][rule]
        lines.append(f"rule {rule} ({state}): dropped {cleaning['dropped'][rule]:,} rows")
    dedup = report["dedup"]
    lines.append("exact duplicates: off (--dedup=none)" if dedup["mode"] == "none" else
                 f"exact duplicates: dropped {dedup['exact_dropped']:,} rows in {dedup['exact_clusters']:,} groups")
    if dedup["mode"] == "near":
        lines.append(f"near duplicates (Jaccard >= {dedup['threshold']} on character {dedup['ngram']}-grams, "
                     f"{dedup['bands']} bands x {dedup['rows_per_band']} rows): dropped {dedup['near_dropped']:,} "
                     f"rows in {dedup['near_clusters']:,} clusters ({dedup['candidate_pairs']:,} candidate pairs, "
                     f"{dedup['verified_pairs']:,} verified)")
    rows = report["rows_out"]
    lines.append(f"wrote {rows.get('train', 0):,} training rows and {rows.get('valid', 0):,} validation rows "
                 f"(seed {report['flags']['seed']}, row groups of {report['row_group_rows']:,})")
    return lines


def rule_states(flags) -> dict:
    """How each rule was set, as the report and the log show it."""
    return {"normalization": flags.normalization, "remove_invisible": on_off(flags.remove_invisible),
            "collapse_whitespace": on_off(flags.collapse_whitespace),
            "traditional_to_simplified": on_off(flags.traditional_to_simplified),
            "empty": "always", "too_short": f"--min_chars={flags.min_chars}",
            "too_long": f"--max_chars={flags.max_chars}",
            "low_cjk_share": f"--min_cjk_share={flags.min_cjk_share}" if flags.min_cjk_share else "off"}


def on_off(value: bool) -> str:
    return "on" if value else "off"

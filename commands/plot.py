"""`plot`: PNG charts of a run from `<output_dir>/metrics.jsonl`, written next to it.

One chart per concern: loss (train and eval on the same axes), BLEU-4, learning rate and memory (process RSS and,
from GPU runs, the GPU figures). A chart with nothing to draw is skipped and said so. The figures are drawn with
matplotlib's object API, which renders PNGs without pyplot's global state or a display.
"""
import json
import os
from collections import defaultdict

from config import resolve_path
from utils.errors import UserError

# chart file -> (title, y label, [(event, field, legend label)])
CHARTS = {
    "loss.png": ("Loss", "cross-entropy per target token",
                 [("train", "loss", "train loss"), ("eval", "eval_loss", "eval loss")]),
    "bleu4.png": ("BLEU-4 on the validation rows", "BLEU-4", [("eval", "bleu4", "BLEU-4")]),
    "lr.png": ("Learning rate", "learning rate", [("train", "lr", "learning rate")]),
    "memory.png": ("Memory", "MB", [("memory", "rss_mb", "process RSS"),
                                    ("memory", "gpu_allocated_mb", "GPU allocated"),
                                    ("memory", "gpu_reserved_mb", "GPU reserved"),
                                    ("memory", "gpu_peak_mb", "GPU peak allocated")]),
}


def read_metrics(path: str) -> tuple[dict, int]:
    """Records by event, and how many lines could not be read (a run killed mid-write leaves half a line)."""
    records, unreadable = defaultdict(list), 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records[record.get("event")].append(record)
            else:
                unreadable += 1
    return records, unreadable


def series(records: dict, event: str, field: str) -> tuple[list, list]:
    """(steps, values) of one field; missing or non-numeric values (a loss of None) are left out."""
    points = [(r["step"], r[field]) for r in records.get(event, [])
              if isinstance(r.get(field), (int, float)) and not isinstance(r.get(field), bool)]
    return [step for step, _ in points], [value for _, value in points]


# Charts of quantities that start at 0 (a score, a rate) show 0: autoscaled to the data alone, a flat BLEU-4 of 0
# drew as a rising line on an axis of 1e-5 steps.
FROM_ZERO = {"BLEU-4", "learning rate"}


def chart(title: str, ylabel: str, lines: list):
    """The figure of one chart; no axis uses an offset (every tick shows its own value)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.8), layout="constrained")
    axes = figure.subplots()
    for steps, values, label in lines:
        # A single point (one evaluation so far) would be invisible as a line.
        axes.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
    axes.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    if ylabel in FROM_ZERO:
        highest = max(max(values) for _, values, _ in lines)
        axes.set_ylim(bottom=0.0, top=1.05 * highest if highest > 0 else 1e-3)
    axes.ticklabel_format(axis="y", useOffset=False)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def run_plot(output_dir: str) -> list[str]:
    """Write the charts that have data; print and return their paths."""
    directory = resolve_path(str(output_dir))
    metrics = os.path.join(directory, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"--output_dir={output_dir}: no metrics.jsonl in {directory} (a training run writes it)")
    records, unreadable = read_metrics(metrics)
    written, skipped = [], []
    for name, (title, ylabel, fields) in CHARTS.items():
        lines = [(*series(records, event, field), label) for event, field, label in fields]
        lines = [line for line in lines if line[0]]
        if not lines:
            skipped.append(name)
            continue
        chart(title, ylabel, lines).savefig(os.path.join(directory, name), dpi=110)
        written.append(os.path.join(directory, name))
    print(f"wrote {len(written)} chart(s) from {metrics}:")
    for path in written:
        print(f"  {path}")
    if skipped:
        print(f"skipped (no data yet): {', '.join(skipped)}")
    if unreadable:
        print(f"ignored {unreadable} unreadable line(s) of metrics.jsonl")
    return written

"""What `plan` prints: one report made of sections of figures, rendered as a table for people or as JSON for
programs. A figure is written once, with its label, its value, how the table shows it and its JSON name, so the two
renderings cannot drift apart."""
import json
from dataclasses import dataclass, field

from commands.plan_memory import GIB, GPU_BUDGET_BYTES, window_rows

GUIDE_STEP_SECONDS = (0.5, 0.8)  # the guide's estimate per optimizer step on its 3 GPUs: only an example


@dataclass(frozen=True)
class Figure:
    label: str
    """The table's label; empty for a figure only programs read (it appears in the JSON alone)."""
    value: object
    """What the JSON holds."""
    shown: str = ""
    """How the table shows the value."""
    note: str = ""
    key: str = ""
    """Its name in the JSON; empty for a line only the table has."""


@dataclass
class Section:
    title: str
    figures: list
    breakdowns: dict = field(default_factory=dict)
    """JSON only: named {part: value} tables of the section's parts (in GiB, in bytes, ...)."""


@dataclass
class PlanReport:
    title: str
    sections: list
    suggestions: list
    notes: list

    def text(self) -> str:
        lines = [self.title]
        for section in self.sections:
            shown = [figure for figure in section.figures if figure.label]
            if shown:
                lines.append(section.title)
                lines.extend(f"  {figure.label:<24}{figure.shown:>14}  {figure.note}".rstrip() for figure in shown)
        for title, items in (("Suggestions", self.suggestions), ("Notes", self.notes)):
            if items:
                lines.append(title)
                lines.extend(f"  - {item}" for item in items)
        return "\n".join(lines)

    def json(self) -> str:
        report = {}
        for section in self.sections:
            report.update({figure.key: figure.value for figure in section.figures if figure.key})
            report.update(section.breakdowns)
        return json.dumps({**report, "suggestions": self.suggestions, "notes": self.notes}, indent=2)


def hours(steps: int, seconds: float) -> float:
    return round(steps * seconds / 3600, 4)


def duration(hours_: float) -> str:
    """A span of time in the unit that reads best: 21.7 h, 35 min, 40 s."""
    if hours_ >= 1:
        return f"{hours_:.1f} h"
    return f"{hours_ * 60:.0f} min" if hours_ * 60 >= 1 else f"{hours_ * 3600:.0f} s"


def gib(size: float) -> float:
    return round(size / GIB, 2)


def schedule_section(plan: dict) -> Section:
    cfg, steps, packed = plan["cfg"], plan["steps"], plan["packing"]
    processes, accumulation = steps["num_processes"], cfg.gradient_accumulation_steps
    return Section("Schedule", [
        Figure("documents" if packed else "rows", plan["rows"], f"{plan['rows']:,}", plan["rows_source"], "rows"),
        Figure("", plan["rows_source"], key="rows_source"), Figure("", cfg.objective, key="objective"),
        *([Figure("chunks", packed, f"{packed['chunks']:,}",
                  f"{packed['tokens']:,} tokens in chunks of {packed['chunk_length']} ({packed['source']}); inputs of "
                  f"{packed['input_length']}, targets of {packed['target_length']} tokens", "packing")]
          if packed else []),
        Figure("", processes, key="num_processes"),
        Figure("global batch", steps["global_batch_size"], f"{steps['global_batch_size']:,}",
               f"{cfg.batch_size_per_gpu} per process x {processes} process{'es' * (processes > 1)} x {accumulation} "
               "accumulation steps", "global_batch_size"),
        Figure("steps per epoch", steps["steps_per_epoch"], f"{steps['steps_per_epoch']:,}",
               f"ceil({'chunks' if packed else 'rows'} / global batch)", "steps_per_epoch"),
        Figure("", cfg.epochs, key="epochs"), Figure("", steps["schedule_steps"], key="schedule_steps"),
        Figure("total steps", steps["total_steps"], f"{steps['total_steps']:,}", f"{cfg.epochs} epochs"
               + (f", stopped by --max_steps (schedule: {steps['schedule_steps']:,})" if cfg.max_steps else ""),
               "total_steps"),
        Figure("warmup steps", cfg.warmup_steps, f"{cfg.warmup_steps:,}",
               f"then cosine decay to {0.1 * cfg.learn_rate:g} at step {steps['schedule_steps']:,}", "warmup_steps"),
        Figure("evaluations and saves", steps["saves"], f"{steps['saves']:,}",
               f"every {cfg.save_steps:,} steps and at each epoch end"
               + ("" if steps["evaluations"] else "; no evaluation (--eval_max_samples=0)"), "saves"),
        Figure("", steps["evaluations"], key="evaluations"),
        Figure("training log lines", steps["logging_lines"], f"{steps['logging_lines']:,}",
               f"every {cfg.logging_steps:,} steps", "logging_lines"),
        Figure("", steps["memory_lines"], key="memory_lines"),
    ])


def model_section(plan: dict) -> Section:
    cfg = plan["cfg"]
    return Section("Model", [
        Figure("parameters", plan["parameters"], f"{plan['parameters']:,}",
               f"vocab {plan['vocab']:,} from {plan['vocab_source']}", "parameters"),
        Figure("", plan["vocab"], key="vocab_size"),
        Figure("trained parameters", plan["trainable"], f"{plan['trainable']:,}",
               "all" if cfg.freeze == "none" else f"--freeze={cfg.freeze}: the rest gets no gradient and no optimizer "
               "state", "trainable_parameters"),
        *([Figure("weights from", cfg.init_from, "--init_from", cfg.init_from)] if cfg.init_from else []),
    ])


def gpu_section(plan: dict) -> Section:
    cfg, gpu, packed = plan["cfg"], plan["gpu"], plan["packing"]
    parts, processes, on_cpu = gpu["parts"], plan["steps"]["num_processes"], plan["device"] == "cpu"
    precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(cfg.mixed_precision, "fp32")
    spare = GPU_BUDGET_BYTES - gpu["total"]
    part = lambda name, label, note: Figure(label, gib(parts[name]), f"{gib(parts[name]):.2f}", note)  # noqa: E731
    rows = (f"{cfg.batch_size_per_gpu} chunks x {cfg.max_seq_len} input + {packed['target_length']} target tokens"
            if packed else f"{cfg.batch_size_per_gpu} pairs x {cfg.max_seq_len} tokens, 2 answers each"
            if plan.get("preference") else f"{cfg.batch_size_per_gpu} rows x {cfg.max_seq_len} tokens")
    activations = (rows
                   + f", {precision} ({gpu['method']}), peak"
                   + ("" if on_cpu else ", attention as CUDA's memory-efficient SDPA kernel keeps it"))
    if on_cpu:
        fit = "in host RAM, with the host's share below"
    else:
        fit = (f"{'fits' if spare >= 0 else 'does NOT fit'} a 20 GiB card ({abs(spare) / GIB:.1f} GiB "
               + ("left)" if spare >= 0 else "over)"))
    return Section("Model memory per process (GiB, host RAM: a CPU run)" if on_cpu
                   else "GPU memory per process (GiB)", [
        part("weights", "weights", "fp32, 4 bytes per parameter"),
        part("gradients", "gradients", "fp32, kept between the micro-batches of a step"
             + ("; they are DDP's all-reduce buckets (no copy)" if processes > 1 else "")),
        part("optimizer_state", "optimizer state", f"--optimizer={cfg.optimizer}: " + (
            "two fp32 moments, 8 bytes per parameter" if cfg.optimizer == "adamw"
            else "factored second moments, a row and a column per matrix")),
        part("activations", "activations", activations),
        *([] if on_cpu else [part("cuda_context", "CUDA context", "outside PyTorch's allocator")]),
        Figure("total", gib(gpu["total"]), f"{gib(gpu['total']):.2f}", fit, "gpu_memory_gb_per_process"),
        Figure("", plan["device"], key="device"),
        Figure("", gpu["method"], key="activation_method"), Figure("", parts["activations"], key="activation_bytes"),
        Figure("", None if on_cpu else gpu["total"] <= GPU_BUDGET_BYTES, key="fits_20gb"),
    ], {"gpu_memory_breakdown_gb": {name: gib(size) for name, size in parts.items()},
        "gpu_memory_breakdown_bytes": dict(parts)})


def host_section(plan: dict) -> Section:
    cfg, host, processes = plan["cfg"], plan["host"], plan["steps"]["num_processes"]
    parts = host["parts"]
    part = lambda name, label, note: Figure(label, gib(parts[name]), f"{gib(parts[name]):.2f}", note)  # noqa: E731
    on_gpu = plan["device"] == "gpu"
    return Section("Host RAM per process (GiB)" if on_gpu else "Host RAM besides the model, per process (GiB)", [
        part("libraries", "libraries", "python, torch, transformers: measured here"),
        *([part("cuda_runtime", "CUDA runtime", "assumed: host side of the CUDA libraries"),
           part("model_copy", "model copy", "built in RAM before it moves to the GPU")] if on_gpu else []),
        part("data_window", "data window", f"2 windows of {window_rows(cfg, plan['rows']):,} rows: text and token "
             "ids"),
        part("workers", "DataLoader workers", host["workers_note"]),
        Figure("total", gib(host["total"]), f"{gib(host['total']):.2f}",
               f"{gib(host['total'] * processes):.2f} GiB for {processes} process{'es' * (processes > 1)} on one "
               "machine", "host_ram_gb_per_process"),
        Figure("", gib(host["total"] * processes), key="host_ram_gb_total"),
        Figure("", host["workers"], key="num_workers"),
    ], {"host_ram_breakdown_gb": {name: gib(size) for name, size in parts.items()}})


def disk_section(plan: dict) -> Section:
    cfg, disk = plan["cfg"], plan["disk"]
    parts = disk["parts"]
    return Section("Disk in output_dir (GiB)", [
        Figure("best models", gib(parts["best_models"]), f"{gib(parts['best_models']):.2f}",
               f"{cfg.keep_latest_n_ckp} x {gib(disk['model']):.2f} (fp32 safetensors)"),
        Figure("final/", gib(parts["final"]), f"{gib(parts['final']):.2f}"),
        Figure("resumable state", gib(parts["state"]), f"{gib(parts['state']):.2f}",
               "weights and optimizer state, twice while a new one replaces the old"),
        Figure("total", gib(disk["total"]), f"{gib(disk['total']):.2f}", f"{gib(disk['free']):.2f} GiB free there now",
               "disk_gb"),
        Figure("", gib(disk["free"]), key="disk_free_gb"),
    ], {"disk_breakdown_gb": {name: gib(size) for name, size in parts.items()}})


def time_section(plan: dict) -> Section:
    steps, seconds = plan["steps"], plan["step_time"]
    low, high = GUIDE_STEP_SECONDS
    per_epoch = [hours(steps["steps_per_epoch"], s) for s in GUIDE_STEP_SECONDS]
    total = [hours(steps["total_steps"], s) for s in GUIDE_STEP_SECONDS]
    examples = [Figure("", list(GUIDE_STEP_SECONDS), key="example_step_time_s"),
                Figure("", per_epoch, key="example_hours_per_epoch"), Figure("", total, key="example_hours_total")]
    if not seconds and plan["device"] == "cpu":  # the guide's figures are its GPUs': no example for a CPU
        return Section("Time", [
            Figure("step time", None, "not given", "--step_time=SECONDS, as a short run here logs it (seconds per "
                   "step)", "step_time_s"),
            Figure("", None, key="hours_per_epoch"), Figure("", None, key="hours_total")])
    if not seconds:
        return Section("Time", [
            Figure("step time", None, "not given", "--step_time=SECONDS, as your GPUs log it (seconds per step)",
                   "step_time_s"),
            Figure(f"at {low}-{high} s/step", None, f"{duration(per_epoch[0])}-{duration(per_epoch[1])}",
                   f"per epoch, {duration(total[0])}-{duration(total[1])} in total (the guide's estimate, an example)"),
            Figure("", None, key="hours_per_epoch"), Figure("", None, key="hours_total"), *examples])
    per_epoch_hours, total_hours = hours(steps["steps_per_epoch"], seconds), hours(steps["total_steps"], seconds)
    return Section("Time (evaluations not included)", [
        Figure("step time", seconds, f"{seconds:g} s", "--step_time", "step_time_s"),
        Figure("time per epoch", per_epoch_hours, duration(per_epoch_hours), "", "hours_per_epoch"),
        Figure("time in total", total_hours, duration(total_hours), f"{steps['total_steps']:,} steps", "hours_total"),
        *examples])


def preference_section(plan: dict) -> Section:
    """DPO: one model in memory, and the reference pass before the first step."""
    preference, steps, seconds = plan["preference"], plan["steps"], plan["step_time"]
    # The pass reads every pair once, forward only (no backward, no optimizer): about a third of a training step's
    # work per global batch.
    pass_hours = hours(steps["steps_per_epoch"], seconds / 3) if seconds else None
    return Section("Preference tuning (DPO), per process", [
        Figure("step activations", gib(preference["activations"]), f"{gib(preference['activations']):.2f}",
               f"{preference['pairs']} pairs: the encoder once per prompt, the decoder on both answers",
               "dpo_activation_gb"),
        Figure("fine-tuning step", gib(preference["sft_activations"]), f"{gib(preference['sft_activations']):.2f}",
               f"{preference['sft_rows']} prompt/response rows, as many answers: "
               + ("a DPO step needs no more" if preference["activations"] <= preference["sft_activations"]
                  else "less than a DPO step"), "sft_equivalent_activation_gb"),
        Figure("reference model", 0.0, "0.00", f"its log-probabilities are computed before training; a second model "
               f"in memory (TRL's way) would add {gib(preference['second_model']):.2f} GiB of weights",
               "reference_model_gb"),
        Figure("reference pass", pass_hours, duration(pass_hours) if seconds else "before step 1",
               f"forward only over the {plan['rows']:,} pairs, once" + (" (about a third of an epoch's time)"
                                                                         if seconds else " (--step_time: its time)"),
               "reference_pass_hours"),
        Figure("", preference["second_model"], key="two_model_design_extra_bytes"),
    ])


def report(plan: dict) -> PlanReport:
    cfg, processes = plan["cfg"], plan["steps"]["num_processes"]
    return PlanReport(f"Plan for {type(cfg).__name__} on {processes} process{'es' * (processes > 1)} (nothing is "
                      "trained; every figure is an estimate)",
                      [schedule_section(plan), model_section(plan), gpu_section(plan),
                       *([preference_section(plan)] if plan.get("preference") else []), host_section(plan),
                       disk_section(plan), time_section(plan)], plan["gpu"]["suggestions"], plan["notes"])

"""`plan` tells what a run will do and need, `plot` draws its metrics, and configs/ holds valid Accelerate configs."""
import ctypes
import dataclasses
import glob
import io
import json
import os

import pytest
import torch
from conftest import write_parquet
from torch.utils._python_dispatch import TorchDispatchMode

from commands import plan_memory
from commands.flags import build
from commands.plan import run_plan
from commands.plan_memory import GIB, AnalyticActivations, ProbedActivations, step_peak_bytes
from commands.plot import run_plot
from commands.options import PlanFlags
from config import T5ModelConfig, TrainConfig, TrainConfigPretrainLarge
from model.t5 import StandInTokenizer
from tests.cli_helpers import REPO, TINY_MODEL, run_cli_raw
from utils.errors import UserError

GUIDE_ARGV = ["plan", "--use_large_config=True", "--num_processes=3", "--num_samples=10000000"]


def plan_json(capsys, flags: dict, num_processes=1, num_samples=0, step_time=0.0, probe=False) -> dict:
    """`plan --json` in this process (the libraries are loaded once for all these tests)."""
    plan_flags = PlanFlags(num_processes=num_processes, num_samples=num_samples, step_time=step_time, json=True,
                           probe=probe)
    run_plan(plan_flags, *build([TrainConfig, T5ModelConfig], flags))
    return json.loads(capsys.readouterr().out)


def no_tokenizer(tmp_path) -> dict:
    """Flags that size the vocabulary from --vocab_size, whatever tokenizer the checkout holds."""
    return {"tokenizer_dir": str(tmp_path / "no_tokenizer"), "vocab_size": 32000}


def test_plan_json_for_the_guide_setting_counts_52084_steps_per_epoch_of_192_rows():
    result = run_cli_raw(GUIDE_ARGV + ["--json", "--probe=False"])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["global_batch_size"] == 192
    assert plan["steps_per_epoch"] == 52084  # ceil(10,000,000 / 192): the last, partial step counts
    assert plan["total_steps"] == 3 * plan["steps_per_epoch"]
    assert plan["warmup_steps"] == 1024
    assert plan["saves"] == plan["evaluations"] == 156252 // 5000 + 3  # no epoch end falls on a multiple of 5000
    assert plan["logging_lines"] == plan["total_steps"] // 100
    assert plan["gpu_memory_gb_per_process"] > plan["gpu_memory_breakdown_gb"]["activations"] > 0
    assert plan["fits_20gb"] is (plan["gpu_memory_gb_per_process"] <= 20) is True
    assert plan["host_ram_gb_per_process"] > 0 and plan["disk_gb"] > 0
    assert plan["hours_per_epoch"] is None and plan["example_hours_per_epoch"][0] > 0


def test_plan_prints_an_aligned_table_for_people(capsys, tmp_path):
    plan_flags = PlanFlags(num_processes=3, num_samples=10_000_000, step_time=0.6, probe=False)
    run_plan(plan_flags, *build([TrainConfigPretrainLarge, T5ModelConfig], no_tokenizer(tmp_path)))
    table = capsys.readouterr().out
    assert "steps per epoch" in table and "52,084" in table
    assert "GPU memory per process (GiB)" in table and "time per epoch" in table
    rows = [line for line in table.splitlines() if line.startswith("  ") and not line.startswith("  - ")]
    assert rows and all(line[39] != " " and line[40:42] in ("", "  ") for line in rows)  # values end in one column


def test_plan_counts_the_rows_of_a_real_parquet_file(capsys, tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [f"问{i}" for i in range(1000)], ["答"] * 1000,
                         row_group_size=300)
    flags = dict(no_tokenizer(tmp_path), train_file=str(path), batch_size_per_gpu=10, gradient_accumulation_steps=3,
                 epochs=2, max_steps=25)
    plan = plan_json(capsys, flags, num_processes=2, step_time=360)
    assert plan["rows"] == 1000
    assert plan["global_batch_size"] == 60 and plan["steps_per_epoch"] == 17  # ceil(1000 / 60)
    assert plan["schedule_steps"] == 34 and plan["total_steps"] == 25  # max_steps stops early
    assert plan["hours_per_epoch"] == 1.7 and plan["hours_total"] == 2.5
    assert not any("assuming" in note for note in plan["notes"])  # the row size came from the footers


def test_plan_without_the_training_file_names_it_and_points_to_num_samples(capsys, tmp_path):
    with pytest.raises(UserError, match=r"^--train_file.*missing\.parquet.*--num_samples"):
        plan_json(capsys, {"train_file": str(tmp_path / "missing.parquet")})


def test_plan_rejects_bad_flags_with_exit_2_naming_each_of_them():
    result = run_cli_raw(["plan", "--num_processes=0", "--step_time=fast", "--num_samples=-5", "--batch_size=3"])
    assert result.returncode == 2
    problems = result.stderr.splitlines()
    assert all(line.startswith("error: ") for line in problems)
    for flag in ("--num_processes", "--step_time", "--num_samples", "--batch_size"):
        assert any(flag in line for line in problems), flag
    assert "Traceback" not in result.stderr


def test_plan_with_the_probe_measures_a_tiny_model(capsys, tmp_path):
    flags = dict(no_tokenizer(tmp_path), **TINY_MODEL, vocab_size=500, max_seq_len=24, batch_size_per_gpu=4)
    plan = plan_json(capsys, flags, num_samples=100, probe=True)
    assert plan["activation_method"] == "probe"
    # The figure is the probe's for the run's micro-batch and precision (bf16: the GPU run's, by default) ...
    probed = ProbedActivations(T5ModelConfig(**TINY_MODEL), 500, "bf16").bytes(4, 24)
    assert plan["activation_bytes"] == plan["gpu_memory_breakdown_bytes"]["activations"] == probed
    assert probed != ProbedActivations(T5ModelConfig(**TINY_MODEL), 500, "no").bytes(4, 24)
    # ... and the total is its parts: fp32 weights and gradients, no optimizer state to speak of, the CUDA context.
    parts = plan["gpu_memory_breakdown_bytes"]
    assert parts["weights"] == parts["gradients"] == 4 * plan["parameters"]
    assert plan["gpu_memory_gb_per_process"] == round(sum(parts.values()) / GIB, 2) and plan["fits_20gb"] is True


def test_the_probe_on_fake_tensors_equals_a_real_cpu_step_byte_for_byte():
    tiny = T5ModelConfig(**TINY_MODEL)
    for precision in ("no", "bf16"):
        torch.manual_seed(0)
        real_model = plan_memory.build_model(tiny, StandInTokenizer(300))
        real = step_peak_bytes(real_model, rows=3, seq_len=20, mixed_precision=precision)
        assert ProbedActivations(tiny, 300, precision, cuda_attention=False).bytes(3, 20) == real > 0


class MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class AllocatorPeak(TorchDispatchMode):
    """The peak of the bytes glibc's malloc hands out (small blocks in its arenas + large ones it maps), read
    after every operator: where PyTorch's CPU tensors really live, counted by the allocator, not by us."""

    def __init__(self):
        super().__init__()
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "mallinfo2"):
            pytest.skip("needs glibc 2.33 or newer (mallinfo2)")
        libc.mallinfo2.restype = MallocInfo
        self.in_use = lambda: (lambda info: info.uordblks + info.hblkhd)(libc.mallinfo2())
        self.base, self.peak = self.in_use(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.base)
        return out


@pytest.mark.parametrize("rows, seq_len", [(16, 96)])
def test_the_probes_counter_agrees_with_the_cpu_allocator_on_a_real_step(rows, seq_len):
    """What this checks: the bytes the probe counts (every tensor storage, from allocation to release) are what
    the allocator holds at the peak of a real CPU step, within 1% and half a MB of allocator overhead. What it cannot
    check here: CUDA's caching allocator (blocks rounded up, segments, fragmentation) and the CUDA kernels' own
    workspaces, which `bench/gpu_check.sh` measures against `plan` on a GPU."""
    model = plan_memory.build_model(T5ModelConfig(d_model=128, d_ff=256, num_heads=4, d_kv=16, num_layers=2,
                                                  num_decoder_layers=2), StandInTokenizer(1000)).train()
    tokens, mask = torch.randint(2, 1000, (rows, seq_len)), torch.ones(rows, seq_len, dtype=torch.long)

    def step(mode):
        for parameter in model.parameters():  # gradients made before: the counter leaves them out, as plan does
            parameter.grad = torch.zeros_like(parameter)
        torch.manual_seed(0)
        with mode:
            plan_memory.token_loss_sum(model, tokens, mask, tokens)[0].backward()
        return mode.peak

    step(AllocatorPeak())  # the allocator's first use of these sizes
    counted, allocated = step(plan_memory.PeakBytes()), step(AllocatorPeak())
    assert counted <= allocated <= 1.01 * counted + 2**19, (counted, allocated)


def test_the_analytic_estimate_is_within_2_percent_of_the_probe_for_the_guide_model():
    model_cfg, cfg = T5ModelConfig(), TrainConfigPretrainLarge()
    probed = ProbedActivations(model_cfg, 32000, cfg.mixed_precision).bytes(cfg.batch_size_per_gpu, cfg.max_seq_len)
    analytic = AnalyticActivations(model_cfg, 32000, cfg.mixed_precision, 189_767_424)
    assert analytic.bytes(cfg.batch_size_per_gpu, cfg.max_seq_len) == pytest.approx(probed, rel=0.02)
    assert 8 * GIB < probed < 20 * GIB


def test_plan_suggests_a_smaller_micro_batch_or_shorter_texts_when_the_card_is_too_small(capsys, tmp_path):
    plan = plan_json(capsys, dict(no_tokenizer(tmp_path), batch_size_per_gpu=64, gradient_accumulation_steps=1,
                                  max_seq_len=192), num_samples=1000)
    assert plan["fits_20gb"] is False
    assert any("--batch_size_per_gpu=" in s and "--gradient_accumulation_steps=" in s for s in plan["suggestions"])
    assert any("--max_seq_len=" in s for s in plan["suggestions"])


def test_plan_falls_back_to_the_analytic_estimate_when_the_probe_breaks(capsys, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a future torch")

    monkeypatch.setattr(plan_memory, "ProbedActivations", broken)
    plan = plan_json(capsys, dict(no_tokenizer(tmp_path), **TINY_MODEL), num_samples=100, probe=True)
    assert plan["activation_method"] == "analytic"
    assert any("a future torch" in note for note in plan["notes"])


def write_metrics(directory, events) -> None:
    with open(directory / "metrics.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps(event) + "\n" for event in events)


def test_plot_writes_a_png_per_chart_and_lists_them(tmp_path):
    events = [dict(event="train", step=s, epoch=0, samples=8 * s, loss=3.0 / s, lr=1e-3 * min(1, s / 4),
                   grad_norm=1.0, tokens_per_s=100.0) for s in range(1, 21)]
    events += [dict(event="eval", step=s, epoch=0, bleu4=s / 100, eval_loss=3.5 / s, samples=8 * s) for s in (10, 20)]
    events += [dict(event="memory", step=s, rss_mb=900.0 + s, available_ram_mb=8000.0, gpu_allocated_mb=5000.0,
                    gpu_reserved_mb=6000.0, gpu_peak_mb=7000.0) for s in (10, 20)]
    write_metrics(tmp_path, events)
    result = run_cli_raw(["plot", f"--output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    for name in ("loss.png", "bleu4.png", "lr.png", "memory.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
        assert str(tmp_path / name) in result.stdout


def test_plot_skips_charts_without_data_and_half_written_lines(tmp_path, capsys):
    write_metrics(tmp_path, [dict(event="train", step=s, loss=None if s == 1 else 2.0, lr=1e-4) for s in (1, 2, 3)])
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as out:
        out.write('{"event": "eval", "st')  # a run killed while writing
    written = run_plot(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["loss.png", "lr.png"]
    out = capsys.readouterr().out
    assert "skipped (no data yet): bleu4.png, memory.png" in out and "1 unreadable line" in out


def test_plot_without_metrics_exits_2_naming_output_dir(tmp_path):
    result = run_cli_raw(["plot", f"--output_dir={tmp_path}"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: --output_dir=") and "metrics.jsonl" in result.stderr
    with pytest.raises(UserError, match="--output_dir"):
        run_plot(str(tmp_path / "nowhere"))


# file -> (distributed type, processes over all machines, machines)
EXPECTED_CONFIGS = {
    "ddp_3gpu.yaml": ("MULTI_GPU", 3, 1),
    "multi_node_ddp.yaml": ("MULTI_GPU", 6, 2),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 3, 1),
}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*"))), ids=os.path.basename)
def test_every_accelerate_config_loads_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    assert os.path.basename(path) in EXPECTED_CONFIGS, "a new config needs its expectations here"
    distributed_type, processes, machines = EXPECTED_CONFIGS[os.path.basename(path)]
    config = ClusterConfig.from_yaml_file(path)
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (
        distributed_type, processes, machines)
    assert config.mixed_precision == "bf16"
    launch_options = vars(launch_command_parser().parse_args(["train_low_mem.py"]))
    unknown = set(config.deepspeed_config) - set(launch_options)
    assert not unknown, f"accelerate launch would ignore {unknown}"


def test_deepspeed_accumulates_as_many_micro_batches_as_the_large_config():
    from accelerate.commands.config.config_args import ClusterConfig

    deepspeed = ClusterConfig.from_yaml_file(os.path.join(REPO, "configs", "deepspeed_zero2.yaml")).deepspeed_config
    assert deepspeed["zero_stage"] == 2
    assert deepspeed["gradient_accumulation_steps"] == TrainConfigPretrainLarge().gradient_accumulation_steps
    assert deepspeed["offload_optimizer_device"] == deepspeed["offload_param_device"] == "none"


def test_plan_times_short_runs_in_minutes_or_seconds_and_counts_workers_as_the_trainer_does(capsys, tmp_path):
    plan_flags = PlanFlags(num_samples=1000, probe=False)
    run_plan(plan_flags, *build([TrainConfig, T5ModelConfig], no_tokenizer(tmp_path)))
    table = capsys.readouterr().out
    time_line = next(line for line in table.splitlines() if "s/step" in line)
    assert "0.0-0.0" not in time_line and "4 s-6 s" in time_line  # 7 steps of 0.5-0.8 s per epoch
    workers = 2 if torch.cuda.is_available() else 0  # training.runtime.decide: none without a GPU
    assert f"{workers} workers (auto:" in table


def test_a_flat_bleu_of_zero_is_drawn_flat_at_zero():
    from commands.plot import chart

    axes = chart("BLEU-4 on the validation rows", "BLEU-4", [([1, 2, 3], [0.0, 0.0, 0.0], "BLEU-4")]).axes[0]
    assert axes.get_ylim()[0] == 0.0 and axes.yaxis.get_major_formatter().get_offset() == ""
    axes = chart("Loss", "loss", [([1, 2], [7.00001, 7.00002], "loss")]).axes[0]
    axes.figure.savefig(io.BytesIO(), format="png")  # lays the ticks out
    assert axes.yaxis.get_major_formatter().get_offset() == ""  # no "+7" offset: each tick shows its value


def test_the_probe_models_the_attention_kernel_a_gpu_runs():
    """CUDA's memory-efficient attention keeps no attention probabilities; the CPU's math path keeps them (and
    their dropout mask) for all 30 attentions of the guide's model: about 5 GiB at 32 rows of 192 tokens."""
    from commands.plan_memory import efficient_attention

    query, key, value = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 3, 5, 5, requires_grad=True)
    kept = {}
    for name, attention in (("efficient", efficient_attention),
                            ("cpu", torch.nn.functional.scaled_dot_product_attention)):
        with plan_memory.PeakBytes() as tracker:
            output = attention(query, key, value, attn_mask=bias, dropout_p=0.5)
            kept[name] = tracker.live
        output.sum().backward()
    # What the kernel keeps past the forward: its output and one fp32 log-sum-exp per query row, nothing of the
    # 2 x 3 x 5 x 5 attention probabilities (which the CPU's path keeps, with their dropout mask).
    assert kept["efficient"] == 4 * (2 * 3 * 5 * 4 + 2 * 3 * 5) < kept["cpu"]
    assert all(t.grad.shape == t.shape for t in (query, key, value, bias))
    model_cfg, cfg = T5ModelConfig(), TrainConfigPretrainLarge()
    on_cpu = ProbedActivations(model_cfg, 32000, "bf16", cuda_attention=False).bytes(32, 192)
    on_gpu = ProbedActivations(model_cfg, 32000, "bf16").bytes(cfg.batch_size_per_gpu, cfg.max_seq_len)
    assert 4.5 * GIB < on_cpu - on_gpu < 5 * GIB


def test_a_cpu_plan_counts_the_model_in_host_ram_without_a_card_and_a_small_file_in_one_window(capsys, tmp_path):
    plan_flags = PlanFlags(device="cpu", num_samples=6000, probe=False, json=True)
    cfg, model_cfg = build([TrainConfig, T5ModelConfig], no_tokenizer(tmp_path))
    run_plan(plan_flags, cfg, model_cfg)
    cpu = json.loads(capsys.readouterr().out)
    run_plan(dataclasses.replace(plan_flags, device="gpu"), cfg, model_cfg)
    gpu = json.loads(capsys.readouterr().out)
    assert cpu["device"] == "cpu" and cpu["fits_20gb"] is None and gpu["fits_20gb"] is True
    assert cpu["gpu_memory_breakdown_bytes"]["cuda_context"] == 0 < gpu["gpu_memory_breakdown_bytes"]["cuda_context"]
    # On a CPU the model is in RAM once (no copy before it moves), and no CUDA runtime is loaded.
    assert cpu["host_ram_breakdown_gb"]["model_copy"] == cpu["host_ram_breakdown_gb"]["cuda_runtime"] == 0
    assert gpu["host_ram_breakdown_gb"]["model_copy"] > 0
    assert "example_hours_total" not in cpu and gpu["example_hours_total"][0] > 0  # the guide's GPU figures
    run_plan(dataclasses.replace(plan_flags, json=False), cfg, model_cfg)
    table = capsys.readouterr().out
    assert "Model memory per process (GiB, host RAM: a CPU run)" in table
    assert "GPU memory" not in table and "CUDA" not in table and "20 GiB card" not in table and "guide" not in table
    assert "2 windows of 6,000 rows" in table  # the buffer (50,000) would hold more rows than the file has

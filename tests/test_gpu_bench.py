"""bench/gpu_bench.py must work the first time a GPU session runs it: its smoke mode and its arithmetic here."""
import importlib.util
import subprocess
import sys

import pytest

from tests.cli_helpers import REPO, child_env

GIB = 1024**3


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", f"{REPO}/bench/gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_gpu_bench_runs_its_smoke_version_on_a_cpu_and_says_so():
    result = subprocess.run([sys.executable, "bench/gpu_bench.py"], cwd=REPO, env=child_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("SMOKE TEST ON CPU") and lines[-1] == "(smoke test on CPU: NOT GPU figures)"
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch"))
    table = lines[header + 1:header + 3]
    assert [row.split()[0] for row in table] == ["2", "4"]
    assert all(float(row.split()[1]) > 0 for row in table)  # samples/s measured
    assert any("release_memory every 2 steps" in line for line in lines)
    assert any(line.startswith("attention kernels at batch 4: ") and "softmax" in line for line in lines)


def test_the_largest_fitting_batch_is_extrapolated_through_the_two_largest_measured_batches():
    bench = load_bench()
    results = [{"batch": 8, "seconds": 0.1, "reserved": 6 * GIB}, {"batch": 16, "seconds": 0.2, "reserved": 8 * GIB},
               {"batch": 32, "seconds": 0.4, "reserved": 12 * GIB}, {"batch": 48, "seconds": None}]
    assert bench.largest_fitting_batch(results) == 64  # 12 GiB + 32 rows x 0.25 GiB = 20 GiB
    assert bench.largest_fitting_batch(results[:1]) is None


def test_mfu_uses_the_peak_of_the_most_specific_device_name():
    bench = load_bench()
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA H200 NVL") == 835.5
    assert bench.peak_tflops("NVIDIA GeForce RTX 3080") == 59.5
    assert bench.peak_tflops("Some Other GPU") is None

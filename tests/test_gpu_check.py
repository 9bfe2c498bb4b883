"""benchmarks/gpu_check.sh, the one command for a GPU machine, in its CPU dry run (tiny sizes)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, ZSQ_GPU_CHECK_DRY="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr + "".join(
        f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in out.glob("*.log"))
    for name in ("summary.md", "env.txt", "backend.txt", "smoke.log", "tests.log", "tests.xml", "kernels.md",
                 "dgh.md", "brecq.md", "memory.md"):
        assert (out / name).is_file(), name
    kernels = (out / "kernels.md").read_text()
    assert "| adaround |" in kernels and "% of copy" in kernels and "(96, 1, 3, 3)" in kernels  # EfficientNet-Lite0
    dgh = (out / "dgh.md").read_text()
    # the device and host store runs, each with s per step, its 1000-iteration extrapolation and a step profile
    assert dgh.count("s per step") == 2 and dgh.count("**Extrapolated** to 1000 iterations") == 2
    assert "device store" in dgh and "host store" in dgh and dgh.count("One step profiled") == 2
    assert "eager / fused" in (out / "brecq.md").read_text()
    assert "Flat in N" in (out / "memory.md").read_text()
    summary = (out / "summary.md").read_text()
    assert "exit 0" in summary and ": skipped" not in summary and "timed out" not in summary
    assert "all cases match" in (out / "smoke.log").read_text()
    assert " passed" in (out / "tests.log").read_text()  # the CUDA tests' selection ran (skipped without a GPU)


def test_gpu_check_runs_only_the_steps_asked_for(tmp_path):
    # a device call is limited in time: the steps are spread over calls with ZSQ_GPU_CHECK_STEPS
    out = tmp_path / "gpu_check"
    env = dict(os.environ, ZSQ_GPU_CHECK_DRY="1", PYTHON=sys.executable, ZSQ_GPU_CHECK_STEPS="smoke")
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "smoke.log").is_file() and "all cases match" in (out / "smoke.log").read_text()
    assert not any((out / name).exists() for name in ("tests.log", "kernels.md", "dgh.md", "brecq.md", "memory.md"))


def test_gpu_check_skips_steps_the_time_budget_cannot_hold(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, ZSQ_GPU_CHECK_DRY="1", PYTHON=sys.executable, ZSQ_GPU_CHECK_BUDGET="1",
               ZSQ_GPU_CHECK_STEPS="smoke kernels")
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr  # a skipped step fails the check
    summary = (out / "summary.md").read_text()
    assert "== smoke: skipped" in summary and "== kernels: skipped" in summary and not (out / "smoke.log").exists()

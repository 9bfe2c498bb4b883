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
    for name in ("summary.md", "env.txt", "backend.txt", "smoke.log", "tests.log", "kernels.md", "speed.md"):
        assert (out / name).is_file(), name
    assert "| adaround |" in (out / "kernels.md").read_text()
    speed = (out / "speed.md").read_text()
    assert "DGH generation throughput" in speed and "eager / fused" in speed and "Extrapolated" in speed
    # the end-to-end runs (exact/device, stale/device, exact/host) each with a one-step profile by part
    assert speed.count("One step profiled") == 3 and "| backward |" in speed and "| optimizer |" in speed
    assert "exit 0" in (out / "summary.md").read_text()
    assert "all cases match" in (out / "smoke.log").read_text()


def test_gpu_check_runs_only_the_steps_asked_for(tmp_path):
    # a device call is limited in time: the steps are spread over calls with ZSQ_GPU_CHECK_STEPS
    out = tmp_path / "gpu_check"
    env = dict(os.environ, ZSQ_GPU_CHECK_DRY="1", PYTHON=sys.executable, ZSQ_GPU_CHECK_STEPS="smoke")
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "smoke.log").is_file() and "all cases match" in (out / "smoke.log").read_text()
    assert not any((out / name).exists() for name in ("tests.log", "kernels.md", "speed.md"))

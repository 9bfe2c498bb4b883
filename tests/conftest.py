import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ZSQ_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real weights and CIFAR-10 images); skips when absent, as in a user's clone."""
    if not (SHARED_DATA / "weights" / "cifar10_resnet20.pt").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (only in the project's CI/dev checkout)")
    return SHARED_DATA


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a loaded 2-core machine OpenMP barrier stalls made
    such tests ~40x slower with 2 threads than with 1. Use: pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_tiny_digits(d: Path, n_images: int) -> Path:
    """A digits_cnn state dict with BN statistics from a few train-mode passes (w.pt) and a labelled npz of
    n_images random 16x16 grey images (data.npz), in folder d, for CLI tests."""
    import numpy as np

    from zsq_fast.models.zoo import ZOO

    torch.manual_seed(0)
    m = ZOO["digits_cnn"].factory()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 16, 16))
    torch.save(m.state_dict(), d / "w.pt")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, (n_images, 16, 16, 1), dtype=np.uint8),
             y=np.arange(n_images) % 10)
    return d


def bn_statistics_from_noise(model, shape, passes: int = 3):
    """`model` in eval mode with BN running statistics from `passes` train-mode forwards of torch.randn(shape)
    (global generator): random weights, and BN layers with statistics to fold and to match."""
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(*shape))
    return model.eval()


def randomize_bn(model, weight: bool = True):
    """BN statistics (and affine parameters) away from 0/1, so folding and quantization have work to do;
    returns the model in eval mode. The draws come from torch's global generator, in module order."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            if weight:
                m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

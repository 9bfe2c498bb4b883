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

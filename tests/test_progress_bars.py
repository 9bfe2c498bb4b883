"""progress=True in the Python API draws tqdm bars as the CLI does (one per stage, none left open); a wrong
value is one clear error."""
import pytest
import torch
from torch import nn

import zsq_fast
from conftest import bn_statistics_from_noise
from zsq_fast.errors import InvalidTypeError
from zsq_fast import progress as bars

pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3))
    return bn_statistics_from_noise(m, (8, 3, 8, 8))


def test_progress_true_draws_a_bar_per_stage_and_closes_them(monkeypatch):
    made = []
    real = bars.tqdm

    def recording(*a, **k):
        bar = real(*a, **k)
        made.append(bar)
        return bar
    monkeypatch.setattr(bars, "tqdm", recording)
    m = _net()
    images, _ = zsq_fast.generate(m, 4, "dgh", 8, iterations=3, chunk_size=4, progress=True)
    assert [b.total for b in made] == [3] and made[0].n == 3 and made[0].desc.startswith("generate dgh")
    q = zsq_fast.quantize(m, images, "W8A8", method="adaround", iterations=4, progress=True)
    stages = made[1:]  # calibration, then the reconstruction (its units' steps on one bar)
    assert [b.total for b in stages] == [1, 4 * len(q.quant_config["units"])]
    assert all(b.n == b.total for b in made)  # every bar ran to its end
    assert all(b.disable for b in made)  # and was closed (tqdm disables a closed bar)


@pytest.mark.parametrize("bad", ["yes", 3])
def test_progress_must_be_true_none_or_a_callable(bad):
    m = _net()
    with pytest.raises(InvalidTypeError, match="progress must be True"):
        zsq_fast.generate(m, 4, "dgh", 8, iterations=1, chunk_size=4, progress=bad)
    with pytest.raises(InvalidTypeError, match="progress must be True"):
        zsq_fast.quantize(m, torch.randn(4, 3, 8, 8), "W8A8", progress=bad)

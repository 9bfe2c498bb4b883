import numpy as np
import pytest
import torch
from torch import nn

from zsq_fast.data import from_uint8, load_images_for
from zsq_fast.evaluate import accuracy, agreement, evaluate
from zsq_fast.models.zoo import load_model


class FixedLogits(nn.Module):
    """Returns preset logits in input order (the images' first pixel holds the row index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        idx = ((x[:, 0, 0, 0] * 0.25 + 0.5) * 255).round().long()
        return self.logits[idx]


def _data(n, labels):
    x = np.zeros((n, 2, 2, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return from_uint8(x, labels, (0.5,) * 3, (0.25,) * 3, 2, "t")


def test_accuracy_top5_and_agreement():
    logits = torch.tensor([[9., 1, 2, 3, 4, 5], [0, 9, 1, 1, 1, 1], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 2, 5])
    assert accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert accuracy(logits, labels, 5) == pytest.approx(2 / 3)
    other = logits.clone()
    other[2] = torch.tensor([0., 0, 0, 0, 0, 1])
    assert agreement(other, logits) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differ"):
        agreement(logits[:2], logits)


def test_evaluate_batches_and_reference():
    torch.manual_seed(0)
    n = 37
    logits = torch.randn(n, 7)
    labels = logits.argmax(1).numpy().copy()
    labels[:10] = (labels[:10] + 1) % 7
    model, ref_logits = FixedLogits(logits), logits.clone()
    ref_logits[30:] = -ref_logits[30:]
    r = evaluate(model, _data(n, labels), reference=FixedLogits(ref_logits), batch_size=8)
    assert r["n"] == n
    assert r["top1"] == pytest.approx(100 * 27 / n, abs=1e-3)
    assert r["agreement"] == pytest.approx(100 * agreement(logits, ref_logits), abs=1e-3)
    assert "top5" in r
    nolabels = evaluate(model, _data(n, None), reference_logits=logits)
    assert "top1" not in nolabels and nolabels["agreement"] == 100.0


def test_labels_beyond_the_model_outputs_are_an_error():
    with pytest.raises(ValueError, match="labels go up to 12 but the model has 7 outputs"):
        evaluate(FixedLogits(torch.randn(3, 7)), _data(3, np.array([0, 1, 12])))


def test_bf16_autocast_on_cpu_is_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model.eval()
    x = np.random.default_rng(0).integers(0, 256, (64, 6, 6, 3), dtype=np.uint8)
    data = from_uint8(x, np.zeros(64, np.int64), (0.5,) * 3, (0.25,) * 3, 6, "t")
    r = evaluate(model, data, reference=model, precision="bf16")
    assert r["agreement"] > 80


def test_resnet20_matches_the_published_accuracy(shared_data):
    src = load_model("resnet20", str(shared_data / "weights" / "cifar10_resnet20.pt"))
    data = load_images_for(str(shared_data / "cifar10_test_exact1017.npz"), src.mean, src.std, src.input_size)
    r = evaluate(src.model, data)
    assert r["top1"] == pytest.approx(91.64, abs=0.06)  # shared/data/README.md's measurement

"""hw: a site is fused with a functional ReLU (unsigned grid) only when the ReLU is really its only reader, and a
layer uses a site's quantizer only for the site's own values. Each model here has a reader that find_sites once
missed (an indexed assignment, a leaf module's second argument, a Flatten module's view) or a ReLU output changed
in place before a layer reads it; each gave a model 30-100 % wrong at W8A8 without an error."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zsq_fast
from conftest import bn_statistics_from_noise

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Add(nn.Module):
    def forward(self, a, b):
        return a + b


class Net(nn.Module):
    """conv c1 -> `a`; the pattern reads `a` (signed) and a ReLU of it; conv c2 / linear heads."""

    def __init__(self, pattern: str, relu_module: bool):
        super().__init__()
        self.pattern = pattern
        self.relu = nn.ReLU() if relu_module else F.relu
        self.c1, self.s = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(8 if pattern == "setitem" else 4, 4, 3, padding=1)
        self.add, self.flat = Add(), nn.Flatten()
        self.fc, self.fc2 = nn.Linear(4 * 64, 10), nn.Linear(4 * 64, 10)

    def forward(self, x):
        a = self.c1(x)
        if self.pattern == "setitem":  # an indexed assignment reads the value before the ReLU
            buf = torch.zeros(x.shape[0], 8, 8, 8)
            buf[:, 4:] = a
            buf[:, :4] = self.relu(a)
            return self.fc(torch.flatten(self.c2(buf), 1))
        if self.pattern == "leaf second arg":  # a parameter-free module reads it as its second argument
            y = self.relu(a)
            return self.fc(torch.flatten(self.c2(y + self.add(self.s(x), a)), 1))
        if self.pattern == "flatten module":  # nn.Flatten makes a view of it that a Linear reads
            f = self.flat(a)
            return self.fc2(f) + self.fc(torch.flatten(self.c2(self.relu(a)), 1))
        y = self.relu(a)
        y += self.s(x) - 3.0  # the ReLU's output changed in place (strongly negative) before it is read
        if self.pattern == "changed then conv":
            return self.fc(torch.flatten(self.c2(y), 1))
        return self.fc(self.flat(y))  # "changed then flatten"


PATTERNS = ["setitem", "leaf second arg", "flatten module", "changed then conv", "changed then flatten"]


@pytest.mark.parametrize("relu_module", [False, True], ids=["F.relu", "nn.ReLU"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_quantized_model_follows_the_float_model(pattern, relu_module):
    torch.manual_seed(0)
    model = bn_statistics_from_noise(Net(pattern, relu_module), (8, 3, 8, 8))
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(model, x, "W8A8", preset="hw", method="nearest")
    with torch.no_grad():
        ref, out = model(x), q.model(x)  # q.model: without the output quantizer (its top-1 scale is coarse)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 0.1, f"{pattern}: max error {err:.3f} of the output range at W8A8"
    c1 = [s for s in q.quant_config["sites"] if s["name"] == "c1"]
    if pattern.startswith("changed"):  # the ReLU alone reads c1's output: fused (its output changes later)
        assert relu_module or (c1[0]["relu_fused"] and not c1[0]["signed"])
    else:  # something else reads c1's output before the ReLU: never an unsigned c1 site
        assert all(s["signed"] and not s.get("relu_fused") for s in c1)

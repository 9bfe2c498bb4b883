"""hw + reconstruction: a site that no unit makes (a pooling module's output) is learned by the unit reading it."""
import importlib

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from zsq_fast.models.cifar_resnet import BasicBlock as CifarBlock
from zsq_fast.quantize import brecq, quantize
from zsq_fast.quantize.brecq import unit_owns_site
from zsq_fast.quantize.cache import capture

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class PooledNet(nn.Module):
    """stem -> avg pool (read by a block: a plain input) -> block -> avg pool -> flatten -> fc (read as a view)."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)
        self.block = CifarBlock(c, 2 * c, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.block(self.pool1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _learners(units: list[dict], site: str) -> list[str]:
    return [u["name"] for u in units
            if unit_owns_site(u["name"], site, u.get("with_activation")) or site in u.get("input_sites", [])]


@pytest.mark.parametrize("method", ["brecq", "adaround"])
def test_every_site_is_learned_by_exactly_one_unit(method):
    torch.manual_seed(0)
    model = randomize_bn(PooledNet()).eval()
    q = quantize(model, torch.randn(16, 3, 16, 16), "W4A4", preset="hw", method=method, iterations=2, batch_size=8,
                 learn_act_scale=True)
    units = q.quant_config["units"]
    sites = [s["name"] for s in q.quant_config["sites"]]
    assert {"pool1", "avgpool"} <= set(sites)
    counts = {s: len(_learners(units, s)) for s in sites}
    if method == "brecq":  # blocks hold the residual adds: every site is learned
        assert counts == {s: 1 for s in sites}
    else:  # layer units learn what layers read; an add operand or a tensor only a pool reads stays calibrated
        read = {e["input_from"] for e in q.quant_config["layers"].values() if "input_from" in e}
        assert max(counts.values()) == 1 and {s for s in sites if counts[s]} >= read and read
    first = {"brecq": "block", "adaround": "block.conv1"}[method]  # the first pool's first reader
    assert _learners(units, "pool1") == [first] and _learners(units, "avgpool") == ["fc"]


@pytest.mark.parametrize("qdrop", [0.0, 0.5])
def test_a_unit_learning_its_input_site_optimises_what_the_model_computes(monkeypatch, qdrop):
    """During the reading unit's reconstruction its input arrives unrounded and the site's quantizer, learning,
    rounds it on the way in (under QDrop it drops it: no float-input mixing): what the loop computes is what the
    quantized model computes there, for the block's shortcut (a pad, no layer) too."""
    torch.manual_seed(0)
    model = randomize_bn(PooledNet()).eval()
    images = torch.randn(16, 3, 16, 16)
    seen = {}
    real = brecq.reconstruct

    def spy(unit, layers, data, cfg, generator, on_step=None, input_sites=(), **kw):
        if input_sites:
            name = next(n for n, m in model_q.named_modules() if m is unit)
            x = data.get(torch.arange(data.n))["x_q"]
            _, y_model = capture(model_q, unit, images, want_output=True)
            (q_in,) = input_sites
            seen[name] = {"match": torch.allclose(unit(q_in(x)), y_model, atol=1e-6),
                          "unrounded": not torch.allclose(x, q_in(x)),
                          "no_float_mix": "x_fp" not in data.get(torch.arange(2)), "steps": []}

            def step(m, args):  # what the loop feeds the unit: rounded (or dropped) by a learning q_in
                x_in = args[0]
                on_grid = torch.equal(q_in(x_in), x_in) if q_in.drop_prob == 0 else None
                seen[name]["steps"].append((on_grid, q_in.log2_scale is not None, q_in.drop_prob == qdrop))
            hook = unit.register_forward_pre_hook(step)
            try:
                return real(unit, layers, data, cfg, generator, on_step, input_sites=input_sites, **kw)
            finally:
                hook.remove()
        return real(unit, layers, data, cfg, generator, on_step, input_sites=input_sites, **kw)

    monkeypatch.setattr(brecq, "reconstruct", spy)
    api = importlib.import_module("zsq_fast.quantize.api")  # the package's `quantize` is the function
    real_rm = api.reconstruct_model

    def keep_model(qmodel, *a, **kw):
        nonlocal model_q
        model_q = qmodel
        return real_rm(qmodel, *a, **kw)

    model_q = None
    monkeypatch.setattr(api, "reconstruct_model", keep_model)
    quantize(model, images, "W4A4", preset="hw", method="brecq", iterations=2, batch_size=8, qdrop=qdrop)
    assert set(seen) == {"block", "fc"}
    assert all(s["match"] and s["unrounded"] and s["no_float_mix"] for s in seen.values()), seen
    on_grid = True if qdrop == 0 else None
    assert all(s["steps"] == [(on_grid, True, True)] * 2 for s in seen.values()), seen


def test_a_reader_of_a_site_shared_by_several_calls_does_not_learn_it():
    """One ReLU module called by two modules keeps one quantizer for both calls (test_site_calls.Shared): its
    reader's input is not fetched unrounded, which would unround the earlier call too; it keeps its calibrated
    scale."""
    from test_site_calls import Shared

    torch.manual_seed(0)
    q = quantize(Shared().eval(), torch.randn(8, 3, 12, 12), "W4A4", preset="hw", method="adaround", iterations=2,
                 batch_size=4, learn_act_scale=True)
    assert q.quant_config["layers"]["b.0"]["input_from"] == "a.1"
    assert [s.get("shared_calls") for s in q.quant_config["sites"] if s["name"] == "a.1"] == [2]
    assert all("a.1" not in u.get("input_sites", []) for u in q.quant_config["units"])


def test_a_site_read_through_a_float_module_is_not_learned_on_the_way_in():
    """A BatchNorm kept float (skip) between a pool and a conv: the conv's input is computed from the pool's
    tensor, not the tensor itself, so rounding it on the way in would be another function; the pool keeps its
    calibrated scale while the classifier still learns the second pool's."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.r, self.mp, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.BatchNorm2d(8)
            self.c2, self.r2, self.pool, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), \
                nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.r2(self.c2(self.bn(self.mp(self.r(self.c(x))))))), 1))

    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    q = quantize(model, torch.randn(16, 3, 16, 16), "W4A4", preset="hw", method="adaround", iterations=2,
                 batch_size=8, skip=["bn"], learn_act_scale=True)
    assert q.quant_config["layers"]["c2"]["input_from"] == "mp"
    assert {u["name"]: u.get("input_sites") for u in q.quant_config["units"]} == {"c": None, "c2": None,
                                                                                  "fc": ["pool"]}


def test_layer_units_learn_input_sites_only_with_activation_scales():
    """adaround learns no activation scale by default: its units take no input site (nothing would learn it)."""
    torch.manual_seed(0)
    model = randomize_bn(PooledNet()).eval()
    q = quantize(model, torch.randn(16, 3, 16, 16), "W4A4", preset="hw", method="adaround", iterations=2, batch_size=8)
    assert not any("input_sites" in u for u in q.quant_config["units"])

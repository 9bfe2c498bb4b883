"""The module patterns of the ImageNet CNN families (issue 29), each in a small net built from the real timm /
efficientnet_pytorch / torchvision modules: generate (dgh) -> quantize (hw) -> export -> onnxruntime, with every
Conv2d/Linear quantized, no float tensor between quantized ops, and onnxruntime running what the fake-quant model
computes; and one test per refusal (one line, before any work)."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zsq_fast
from conftest import bn_statistics_from_noise
from zsq_fast.errors import UnsupportedModelError

timm = pytest.importorskip("timm", reason="timm is a test dependency (requirements-test.txt)")
from timm import layers as tl  # noqa: E402
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16


class Net(nn.Module):
    """stem conv/BN/ReLU -> body -> global pool -> linear: the body is the pattern under test."""

    def __init__(self, body: nn.Module, chs: int = 8, out_chs: int | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, chs, 3, padding=1, bias=False), nn.BatchNorm2d(chs), nn.ReLU())
        self.body = body
        self.head = nn.Linear(out_chs or chs, 10)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.body(self.stem(x)), 1), 1))


def _through(model: nn.Module, tmp_path, bits: str = "W8A8", cos: float = 0.9):
    """The whole data-free path; returns the quantized model after checking it end to end."""
    pytest.importorskip("onnxruntime")
    from zsq_fast.quantize.onnx_qdq import float_edges
    import onnx

    torch.manual_seed(0)
    bn_statistics_from_noise(model, (8, 3, SIZE, SIZE))
    images, _ = zsq_fast.generate(model, 16, "dgh", SIZE, iterations=2, chunk_size=16, seed=0)
    q = zsq_fast.quantize(model, images[:8], bits, preset="hw")
    float_layers = [n for n, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert float_layers == [] and q.quant_config["float_modules"] == []
    with torch.no_grad():
        a, b = model(images[8:]), q(images[8:])
    assert F.cosine_similarity(a, b, dim=1).mean() > cos
    path = tmp_path / "m.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, SIZE, SIZE))
    assert float_edges(onnx.load(str(path))) == []  # every data op reads integer-grid tensors
    r = zsq_fast.evaluate_onnx(path, images, reference=q, threads=1, compare_default_options=False)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] <= 1.0, r
    return q


def _reloads(q, model, tmp_path):
    """save -> load_quantized on a fresh copy of the float architecture gives the same outputs."""
    zsq_fast.save_quantized(q, tmp_path / "q.pt")
    again = zsq_fast.load_quantized(tmp_path / "q.pt", model)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(q(x), again(x))


# ---------------------------------------------------------------- norm + activation modules
@pytest.mark.parametrize("act", [nn.ReLU, nn.Hardswish, nn.SiLU])
def test_batchnorm_act_folds_and_its_activation_is_a_site(act, tmp_path):
    body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                         tl.BatchNormAct2d(16, act_layer=act, drop_layer=nn.Dropout),
                         nn.Conv2d(16, 8, 1, bias=False), tl.BatchNormAct2d(8, apply_act=False))
    model = Net(body)
    q = _through(model, tmp_path)
    cfg = q.quant_config
    assert ["body.0", "body.1.norm"] in cfg["folded_bn"] and ["body.2", "body.3.norm"] in cfg["folded_bn"]
    assert cfg["canonical_norms"] == ["body.1", "body.3"]
    sites = {s["name"]: s for s in cfg["sites"]}
    assert "body.1.act" in sites and "body.0" not in sites  # the activation is the conv's requantization
    assert sites["body.1.act"]["signed"] is (act is not nn.ReLU)
    _reloads(q, model, tmp_path)


def test_frozen_norms_fold(tmp_path):
    from torchvision.ops import FrozenBatchNorm2d
    body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), tl.BatchNormAct2d(8),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    model = Net(body)
    torch.manual_seed(0)
    bn_statistics_from_noise(model, (8, 3, SIZE, SIZE))
    model.body[1] = tl.freeze_batch_norm_2d(model.body[1])  # timm's FrozenBatchNormAct2d
    frozen = FrozenBatchNorm2d(8)
    for k in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, k).copy_(getattr(model.body[3], k).detach())
    model.body[3] = frozen
    assert type(model.body[1]).__name__ == "FrozenBatchNormAct2d"
    q = zsq_fast.quantize(model, torch.randn(8, 3, SIZE, SIZE), "W8A8", preset="hw")
    assert [list(p) for p in q.quant_config["folded_bn"]] == [["stem.0", "stem.1"], ["body.0", "body.1.norm"],
                                                              ["body.2", "body.3"]]
    _reloads(q, model, tmp_path)


# ---------------------------------------------------------------- convs with their own forward
def _same_padding_convs():
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding
    return {"static": lambda: Conv2dStaticSamePadding(8, 8, 3, stride=2, image_size=SIZE, bias=False),
            "dynamic": lambda: Conv2dDynamicSamePadding(8, 8, 3, stride=2, bias=False),
            "timm_same": lambda: tl.Conv2dSame(8, 8, 3, stride=2, bias=False),
            "reflect": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect", bias=False)}


@pytest.mark.parametrize("kind", ["static", "dynamic", "timm_same", "reflect"])
def test_convs_with_their_own_forward_keep_their_padding(kind, tmp_path):
    if kind in ("static", "dynamic"):
        pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    conv = _same_padding_convs()[kind]()
    model = Net(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU6()))
    q = _through(model, tmp_path)
    layer = q.model.get_submodule("body.0")
    assert layer.own_forward is not None
    x = torch.randn(2, 8, SIZE, SIZE)
    with torch.no_grad():  # the padding of the original forward, on the quantized weight
        assert layer(x).shape == conv(x).shape
    assert not [k for k in q.state_dict() if "static_padding" in k]
    _reloads(q, model, tmp_path)


def test_mixed_conv_splits_and_concatenates(tmp_path):
    model = Net(nn.Sequential(tl.MixedConv2d(8, 8, [3, 5], depthwise=True), nn.BatchNorm2d(8), nn.ReLU()))
    _through(model, tmp_path)


# ---------------------------------------------------------------- attention, gates, drop path
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
def test_squeeze_excite_gate_and_drop_path(gate, tmp_path):
    se = partial(SqueezeExcite, gate_layer=gate, rd_ratio=0.5)
    block = InvertedResidual(8, 8, exp_ratio=2.0, se_layer=se, act_layer=nn.Hardswish,
                             norm_layer=tl.BatchNormAct2d, drop_path_rate=0.2)
    model = Net(block)
    q = _through(model, tmp_path)
    sites = {s["name"]: s for s in q.quant_config["sites"]}
    assert sites["body.se.gate"]["signed"] is False  # a gate in [0, 1]: an unsigned grid
    assert not [n for n in sites if "drop_path" in n]  # eval DropPath returns its input: no site of its own


# ---------------------------------------------------------------- concatenation, split, shuffle
def _concat_split_bodies():
    from timm.models.densenet import DenseBlock
    from timm.models.ghostnet import GhostBottleneck
    from timm.models.rexnet import LinearBottleneck
    from torchvision.models.shufflenetv2 import InvertedResidual as ShuffleUnit
    return {"densenet": (lambda: DenseBlock(2, 8, bn_size=2, growth_rate=4), 16),
            "ghost": (lambda: GhostBottleneck(8, 16, 8, se_ratio=0.25), 8),
            # GhostNetV2's attention: cat([x1, x2])[:, :c] * resize(gate)
            "ghost_attn": (lambda: GhostBottleneck(8, 16, 8, mode="attn"), 8),
            # ReXNet: cat([conv(x)[:, :c] + x, conv(x)[:, c:]])
            "rexnet": (lambda: LinearBottleneck(8, 12, 1, exp_ratio=2.0), 12),
            "shuffle": (lambda: nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1)), 16)}


@pytest.mark.parametrize("kind", ["densenet", "ghost", "ghost_attn", "rexnet", "shuffle"])
def test_concatenation_split_and_channel_shuffle(kind, tmp_path):
    make, out = _concat_split_bodies()[kind]
    _through(Net(make(), out_chs=out), tmp_path)


# ---------------------------------------------------------------- reparameterizable blocks
@pytest.mark.parametrize("block", ["repvgg", "mobileone", "mobileone_wider"])
@pytest.mark.parametrize("reparameterized", [False, True])
def test_reparameterizable_blocks(block, reparameterized, tmp_path):
    from timm.models.byobnet import MobileOneBlock, RepVggBlock
    out = 16 if block == "mobileone_wider" else 8  # wider: no identity branch (`identity_out = 0` is added)
    body = RepVggBlock(8, 8) if block == "repvgg" else MobileOneBlock(8, out, num_conv_branches=2)
    model = Net(body, out_chs=out)
    if reparameterized:
        torch.manual_seed(1)
        bn_statistics_from_noise(model, (8, 3, SIZE, SIZE))
        body.reparameterize()
    q = _through(model, tmp_path)
    if not reparameterized and block != "mobileone_wider":  # the identity branch's BN reads the block input: a quantized depthwise 1x1 conv
        assert q.quant_config["bn_as_conv"]


# ---------------------------------------------------------------- refusals, before any work
class _Untouchable(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        raise AssertionError("the calibration data was read before the model was refused")


def _refused(model, match):
    with pytest.raises(UnsupportedModelError, match=match) as e:
        zsq_fast.quantize(model.eval(), _Untouchable(), "W8A8", preset="hw")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_layernorm_is_refused_naming_its_path():
    model = Net(nn.Sequential(nn.Conv2d(8, 8, 1), tl.LayerNorm2d(8)))
    msg = _refused(model, r"^body\.1 \(LayerNorm2d\)")
    assert "skip=" in msg


def test_condconv_is_refused_naming_its_path():
    model = Net(nn.Sequential(tl.CondConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)))
    _refused(model, r"^body\.0 \(CondConv2d\) holds parameters that are not a Conv2d/Linear weight")


def test_conv_subclass_with_other_parameters_is_refused():
    class ScaledConv(nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.gain = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return super().forward(x) * self.gain
    _refused(Net(nn.Sequential(ScaledConv(8, 8, 1), nn.BatchNorm2d(8))), r"^body\.0 \(ScaledConv\)")


def test_norm_subclass_with_another_forward_is_refused():
    class PreActNorm(nn.BatchNorm2d):  # its child runs before the normalization, not after
        def __init__(self, n):
            super().__init__(n)
            self.act = nn.ReLU()

        def forward(self, x):
            return super().forward(self.act(x))
    model = Net(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), PreActNorm(8)))
    torch.manual_seed(0)
    bn_statistics_from_noise(model, (8, 3, SIZE, SIZE))
    with pytest.raises(UnsupportedModelError, match=r"^body\.1 \(PreActNorm\): a norm module whose forward"):
        zsq_fast.quantize(model, torch.randn(8, 3, SIZE, SIZE), "W8A8", preset="hw")


def test_skip_keeps_a_refused_module_float_deliberately():
    model = Net(nn.Sequential(nn.Conv2d(8, 8, 1), tl.LayerNorm2d(8)))
    q = zsq_fast.quantize(model.eval(), torch.randn(8, 3, SIZE, SIZE), "W8A8", preset="hw", skip=["body.1"])
    assert q.quant_config["float_modules"] == ["body.1"]


def test_cli_refuses_before_generating(tmp_path, capsys):
    from zsq_fast.cli import main
    code = main(["quantize", "--model", "timm:convnext_atto", "--generator", "dgh", "-n", "8",
                 "--out", str(tmp_path / "q.pt"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "(LayerNorm2d)" in err, err
    assert not (tmp_path / "q.pt").exists()

"""Property-based fuzzing of the public API and the CLI (hypothesis).

Every call gets random and adversarial arguments (wrong types, shapes, dtypes, bit widths, empty and
huge values, NaN/inf in inputs and in model weights, truncated and random-byte files, unwritable paths)
and must end in one of two ways: a valid result (finite, of the promised shape), or a zsq_fast error
(a ZsqFastError subclass) with a one-line message naming the argument at fault. Never another
exception type, never a hang (tiny models, bounded sizes and iterations), never a partial output file.

CI runs a bounded number of examples per test (ZSQ_FAST_FUZZ_EXAMPLES, default 25, derandomized: the
whole file takes seconds); for a long run set ZSQ_FAST_FUZZ_EXAMPLES=1000 ZSQ_FAST_FUZZ_RANDOM=1.
"""
import io
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import zsq_fast
from zsq_fast.cli import main
from zsq_fast.errors import (FileFormatError, InvalidArgumentError, InvalidTypeError, NonFiniteError, PathError,
                             ShapeMismatchError, ZsqFastError)
from zsq_fast.models.zoo import ZOO
from zsq_fast.quantize import QuantizedModel

EXAMPLES = int(os.environ.get("ZSQ_FAST_FUZZ_EXAMPLES", "25"))
# deadline: a tiny-model call taking 20 s is a hang (hypothesis re-runs it to confirm before failing)
FUZZ = settings(max_examples=EXAMPLES, deadline=20_000, derandomize=not os.environ.get("ZSQ_FAST_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SIZE = 8  # the tiny net's input size


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TinyNet(nn.Module):
    """2 conv-BN-ReLU (second one strided) -> pool -> linear: each call takes well under a millisecond."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    m = TinyNet()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


_QMODEL: dict = {}


def tiny_quantized() -> QuantizedModel:
    if "q" not in _QMODEL:
        _QMODEL["q"] = zsq_fast.quantize(tiny_net(), torch.randn(8, 3, SIZE, SIZE), "W4A4", calibration="minmax")
    return _QMODEL["q"]


def outcome(call, names: tuple[str, ...] = ()):
    """Run call(); return its result, or the ZsqFastError it raised after checking the message is one
    line and names one of `names` (the argument(s) mutated). Any other exception fails the test."""
    try:
        r = call()
        event("valid result")
        return r
    except ZsqFastError as e:
        event(type(e).__name__)
        msg = str(e)
        assert msg and "\n" not in msg, f"not one line: {msg!r}"
        if names:
            assert any(n in msg for n in names), f"{type(e).__name__} does not name {names}: {msg}"
        return e


def files_in(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def check_quantized(q, n_in: int = 2) -> None:
    assert isinstance(q, QuantizedModel)
    for k, t in q.state_dict().items():
        assert not t.is_floating_point() or bool(torch.isfinite(t).all()), k
    with torch.no_grad():
        assert bool(torch.isfinite(q(torch.randn(n_in, 3, SIZE, SIZE))).all())


# ---------------------------------------------------------------- adversarial values
nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
huge = st.sampled_from([1e30, -1e30, 3e38, 10 ** 12])
# sizes stay tiny or absurd (10**13): a merely large value is legitimate long work, not a fuzz target
odd_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from([10 ** 13, -10 ** 13]),
                        st.floats(allow_nan=True),
                        st.text(max_size=6), st.just([]), st.just({}), st.just(object()))


@st.composite
def image_tensors(draw, valid_shape=(3, SIZE, SIZE)):
    """Mostly well-formed images, often with a broken shape, dtype or NaN/inf/huge values."""
    n = draw(st.integers(0, 4))
    shape = draw(st.one_of(st.just((n, *valid_shape)),
                           st.lists(st.integers(0, 10), min_size=0, max_size=5).map(tuple)))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.int64,
                                  torch.bool, torch.complex64]))
    x = torch.randn(shape).to(dtype) if dtype != torch.bool else torch.randn(shape) > 0
    if x.numel() and x.is_floating_point() and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.one_of(nonfinite, huge))
    return x


def poison(model: nn.Module, data) -> str:
    """Put NaN/inf/huge values (or a negative BN variance) into one weight; returns its name."""
    tensors = dict(model.named_parameters()) | {k: v for k, v in model.named_buffers() if v.is_floating_point()}
    name = data.draw(st.sampled_from(sorted(tensors)), label="poisoned")
    t = tensors[name].data
    t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(st.one_of(nonfinite, huge, st.just(-1.0)))
    return name


# ---------------------------------------------------------------- quantize
QUANT_ARGS = {
    "bits": st.one_of(st.sampled_from(["W4A4", "w8a8", "W2A16", "W1A4", "W17A4", "W4", "", " W3A5 "]), odd_scalars),
    "preset": st.one_of(st.sampled_from(["hw", "academic", "HW"]), odd_scalars),
    "method": st.one_of(st.sampled_from(["nearest", "adaround", "brecq", "round"]), odd_scalars),
    "calibration": st.one_of(st.sampled_from(["mse", "minmax", "percentile", "max"]), odd_scalars),
    "iterations": st.one_of(st.integers(-3, 2), st.none(), odd_scalars),
    "batch_size": st.one_of(st.integers(-2, 10 ** 12), odd_scalars),
    "qdrop": st.one_of(st.booleans(), st.floats(-1, 2), nonfinite, odd_scalars),
    "lr": st.one_of(st.floats(allow_nan=True, allow_infinity=True), odd_scalars),
    "percentile": st.one_of(st.floats(-10, 200), nonfinite, odd_scalars),
    "act_samples": st.one_of(st.integers(-2, 10 ** 9), odd_scalars),
    "seed": st.one_of(st.integers(-5, 2 ** 70), odd_scalars),
    "cache": st.one_of(st.sampled_from(["host", "device", "recompute", "gpu"]), odd_scalars),
    "device": st.one_of(st.sampled_from(["cpu", "cuda:7", "tpu", "bogus"]), odd_scalars),
    "skip": st.one_of(st.lists(st.sampled_from(["conv1", "bn1", "fc", "nope", ""]), max_size=2), odd_scalars),
    "learn_act_scale": st.one_of(st.booleans(), odd_scalars),
}


@FUZZ
@given(data=st.data())
def test_quantize_gives_a_finite_model_or_a_named_error(data):
    model = tiny_net()
    kwargs = {"bits": "W4A4", "method": "nearest", "calibration": "minmax"}
    images = torch.randn(4, 3, SIZE, SIZE)
    names = []
    for arg in data.draw(st.lists(st.sampled_from([*QUANT_ARGS, "calib_images", "model_weights"]),
                                  min_size=1, max_size=2, unique=True), label="mutated"):
        if arg == "calib_images":
            images = data.draw(st.one_of(image_tensors(), odd_scalars, st.lists(image_tensors(), max_size=2)),
                               label="calib_images")
            names.append("calib_images")
        elif arg == "model_weights":
            names += ["model", poison(model, data)]
        else:
            kwargs[arg] = data.draw(QUANT_ARGS[arg], label=arg)
            names.append(arg)
    if kwargs.get("method") in ("adaround", "brecq"):  # reconstruction: keep it to a few steps
        it = kwargs.get("iterations")
        kwargs["iterations"] = it if not isinstance(it, int) or isinstance(it, bool) or it < 1 else min(it, 2)
        if "iterations" not in names:
            kwargs["iterations"] = 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = outcome(lambda: zsq_fast.quantize(model, images, **kwargs), tuple(names))
    if not isinstance(r, ZsqFastError):
        check_quantized(r)
    for k, v in model.state_dict().items():  # the float model is left unchanged either way
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k


def test_the_three_reported_failures_are_named():
    m = tiny_net()
    x = torch.randn(8, 3, SIZE, SIZE)
    x[3, 1, 2, 2] = math.nan
    x[6] = math.inf
    with pytest.raises(NonFiniteError, match=r"calib_images holds 193 non-finite values .* 2 of 8 images "
                                             r"\(indices 3, 6\)"):
        zsq_fast.quantize(m, x, "W4A4")
    with pytest.raises(ShapeMismatchError, match=r"calib_images of shape \(8, 1, 8, 8\) at layer 'conv1' "
                                                 r"\(Conv2d, expects input \(N, 3, H, W\), given \(2, 1, 8, 8\)\)"):
        zsq_fast.quantize(m, torch.randn(8, 1, SIZE, SIZE), "W4A4")
    with tempfile.TemporaryDirectory() as d:
        for content in (b"hello world\n", b"e" * 5000, b""):
            (Path(d) / "f").write_bytes(content)
            with pytest.raises(FileFormatError, match="is not a zsq_fast quantized model checkpoint"):
                zsq_fast.load_quantized(Path(d) / "f", m)


def test_non_finite_activations_are_refused_with_layer_and_images():
    m = tiny_net()
    m.conv1.weight.data.fill_(1.0)
    m.bn1.weight.data.fill_(3e38)  # finite weights, but the first block overflows to inf
    with pytest.raises(NonFiniteError, match=r"at the input of layer 'conv2' on calibration images 0\.\.3"):
        zsq_fast.quantize(m, torch.randn(6, 3, SIZE, SIZE), "W4A4", batch_size=4)


def test_quantize_never_returns_a_non_finite_model(monkeypatch):
    """The last step of quantize checks every scale, weight and bias: a NaN scale that slipped through
    calibration (simulated here) is refused, naming the tensor."""
    from zsq_fast.quantize import api

    real = api.weight_scale

    def nan_scale(w, spec, method, **kw):
        s, z = real(w, spec, method, **kw)
        if w.shape[0] == 3:  # the linear layer
            s = s.clone()
            s[1] = math.nan
        return s, z

    monkeypatch.setattr(api, "weight_scale", nan_scale)
    with pytest.raises(NonFiniteError, match=r"'model\.fc\.weight_quantizer\.scale'"):
        zsq_fast.quantize(tiny_net(), torch.randn(4, 3, SIZE, SIZE), "W4A4", preset="academic")


# ---------------------------------------------------------------- generate
GEN_ARGS = {
    "n_images": st.one_of(st.integers(-2, 5), st.just(10 ** 12), odd_scalars),
    "method": st.one_of(st.sampled_from(["dgh", "bns", "fdda", "zeroq"]), odd_scalars),
    "image_size": st.one_of(st.integers(-1, 12), st.tuples(st.integers(0, 12), st.integers(0, 12)),
                            st.just(10 ** 7), odd_scalars),
    "iterations": st.one_of(st.integers(-2, 2), odd_scalars),
    "chunk_size": st.one_of(st.integers(-1, 10 ** 12), odd_scalars),
    "lr": st.one_of(st.floats(allow_nan=True, allow_infinity=True), odd_scalars),
    "mean": st.one_of(st.lists(st.one_of(st.floats(-2, 2), nonfinite), max_size=4), odd_scalars),
    "std": st.one_of(st.lists(st.one_of(st.floats(-1, 2), nonfinite), max_size=4), odd_scalars),
    "store": st.one_of(st.sampled_from(["host", "device", "disk"]), odd_scalars),
    "amp": st.one_of(st.sampled_from([None, "bf16", "fp16", "fp8"]), odd_scalars),
    "aggregation": st.one_of(st.sampled_from(["exact", "stale", "mean"]), odd_scalars),
    "layer_weighting": st.one_of(st.sampled_from(["average", "first_x10", "last"]), odd_scalars),
    "odsl_form": st.one_of(st.sampled_from(["hinged", "plain", "soft"]), odd_scalars),
    "lambda_sigma": st.one_of(st.floats(-1, 20), nonfinite, odd_scalars),
    "odsl_weight": st.one_of(st.floats(-1, 1), nonfinite, odd_scalars),
    "seed": st.one_of(st.integers(-3, 2 ** 70), odd_scalars),
    "margin": st.one_of(st.integers(-2, 6), odd_scalars),
    "device": st.one_of(st.sampled_from(["cpu", "cuda:3", "bogus"]), odd_scalars),
    "progress": st.one_of(st.just(lambda *a: None), odd_scalars),
}


@FUZZ
@given(data=st.data())
def test_generate_gives_finite_images_or_a_named_error(data):
    model = tiny_net()
    kwargs = {"n_images": 3, "method": "bns", "image_size": SIZE, "iterations": 2, "chunk_size": 2}
    names = []
    for arg in data.draw(st.lists(st.sampled_from([*GEN_ARGS, "model_weights", "real_images", "checkpoint"]),
                                  min_size=1, max_size=2, unique=True), label="mutated"):
        if arg == "model_weights":
            names += ["model", poison(model, data)]
        elif arg == "real_images":
            kwargs["method"] = "fdda"
            kwargs["real_images"] = data.draw(st.one_of(image_tensors(), odd_scalars), label="real_images")
            kwargs["real_labels"] = data.draw(st.one_of(st.lists(st.integers(-1, 5), max_size=5).map(torch.tensor),
                                                        odd_scalars), label="real_labels")
            names += ["real_images", "real_labels", "fdda", "real label"]
        elif arg == "checkpoint":
            names.append("checkpoint")
        else:
            kwargs[arg] = data.draw(GEN_ARGS[arg], label=arg)
            names.append(arg)
    if kwargs.get("method") == "fdda" and "real_images" not in kwargs:
        kwargs["real_images"], kwargs["real_labels"] = torch.randn(3, 3, SIZE, SIZE), torch.tensor([0, 1, 2])
    it = kwargs.get("iterations")
    if isinstance(it, int) and not isinstance(it, bool):
        kwargs["iterations"] = min(it, 2)  # bounded run time
    with tempfile.TemporaryDirectory() as d:
        if "checkpoint" in names:
            ckpt = Path(d) / "gen.ckpt"
            kind = data.draw(st.sampled_from(["random", "empty", "truncated", "dir", "under_file", "other"]),
                             label="checkpoint")
            if kind == "random":
                ckpt.write_bytes(data.draw(st.binary(max_size=300)))
            elif kind == "empty":
                ckpt.write_bytes(b"")
            elif kind == "dir":
                ckpt.mkdir()
            elif kind == "under_file":
                (Path(d) / "f").write_text("x")
                ckpt = Path(d) / "f" / "gen.ckpt"
            else:  # a real checkpoint, cut short or of a run with other settings
                zsq_fast.generate(tiny_net(), 3, "bns", SIZE, iterations=1, chunk_size=2, checkpoint=ckpt)
                if kind == "truncated":
                    raw = ckpt.read_bytes()
                    ckpt.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
                names += ["other settings"]
            kwargs["checkpoint"] = ckpt
        before = files_in(d)
        r = outcome(lambda: zsq_fast.generate(model, **kwargs), tuple(names))
        if isinstance(r, ZsqFastError):
            assert not {f for f in files_in(d) - before if "tmp" in f}, "temporary files left behind"
            return
    images, record = r
    n, size = kwargs["n_images"], kwargs["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    assert images.shape == (n, 3, h, w) and bool(torch.isfinite(images).all())
    assert len(record.losses) == record.steps_done


# ---------------------------------------------------------------- files: save_* / load_*
@st.composite
def damaged(draw, raw: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "random", "empty", "text"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    if kind == "random":
        return draw(st.binary(max_size=2000))
    return b"" if kind == "empty" else b"just some text\n" * draw(st.integers(1, 300))


def _saved_bytes(save) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.pt"
        save(p)
        return p.read_bytes()


_RAW: dict = {}


def raw_quantized() -> bytes:
    if "q" not in _RAW:
        _RAW["q"] = _saved_bytes(lambda p: zsq_fast.save_quantized(tiny_quantized(), p))
        _RAW["img"] = _saved_bytes(lambda p: zsq_fast.save_images(torch.randn(3, 3, SIZE, SIZE), p))
    return _RAW["q"]


@FUZZ
@given(data=st.data())
def test_damaged_files_load_or_are_named(data):
    raw_quantized()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        which = data.draw(st.sampled_from(["quantized", "images_pt", "png", "npz"]), label="file")
        if which == "quantized":
            (d / "q.pt").write_bytes(data.draw(damaged(_RAW["q"])))
            r = outcome(lambda: zsq_fast.load_quantized(d / "q.pt", tiny_net()), ("q.pt",))
            if not isinstance(r, ZsqFastError):
                check_quantized(r)
        elif which == "images_pt":
            (d / "i.pt").write_bytes(data.draw(damaged(_RAW["img"])))
            r = outcome(lambda: zsq_fast.load_images(d / "i.pt"), ("i.pt",))
            if not isinstance(r, ZsqFastError):
                assert r.dim() == 4 and bool(torch.isfinite(r).all())
        elif which == "png":
            zsq_fast.save_images(torch.randn(3, 3, SIZE, SIZE), d / "pngs", labels=torch.tensor([0, 1, 2]))
            f = d / "pngs" / data.draw(st.sampled_from(["00001.png", "labels.txt"]))
            f.write_bytes(data.draw(damaged(f.read_bytes())))
            r = outcome(lambda: zsq_fast.load_images(d / "pngs", with_labels=True), (f.name,))
            if not isinstance(r, ZsqFastError):
                assert r[0].shape == (3, 3, SIZE, SIZE) and bool(torch.isfinite(r[0]).all())
        else:
            from zsq_fast.data import load_images_for

            buf = io.BytesIO()
            np.savez(buf, x=np.zeros((2, SIZE, SIZE, 3), np.uint8), y=np.array([0, 1]))
            (d / "d.npz").write_bytes(data.draw(damaged(buf.getvalue())))
            r = outcome(lambda: load_images_for(str(d / "d.npz"), [0.5] * 3, [0.25] * 3, SIZE).take([0, 1]),
                        ("d.npz",))
            if not isinstance(r, ZsqFastError):
                assert r[0].shape == (2, 3, SIZE, SIZE)


def test_random_bytes_in_a_valid_zip_are_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "z.pt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(FileFormatError, match="z.pt"):
        zsq_fast.load_quantized(tmp_path / "z.pt", tiny_net())


BAD_PATHS = st.sampled_from(["dir", "under_file", "empty", "none", "int", "bytes"])


def _bad_path(kind: str, d: Path):
    if kind == "dir":
        (d / "out.pt").mkdir()
        return d / "out.pt"
    if kind == "under_file":
        (d / "file").write_text("x")
        return d / "file" / "out.pt"
    return {"empty": "", "none": None, "int": 3, "bytes": b"out.pt"}[kind]


@FUZZ
@given(kind=BAD_PATHS, what=st.sampled_from(["save_quantized", "save_images_pt", "save_images_png", "export_onnx"]))
def test_unwritable_paths_are_named_and_leave_nothing_behind(kind, what):
    q = tiny_quantized()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = _bad_path(kind, d)
        if what == "save_images_png" and kind == "dir":
            (d / "out.pt" / "00000.png").write_bytes(b"x")  # a folder already holding PNGs
        before = files_in(d)
        call = {"save_quantized": lambda: zsq_fast.save_quantized(q, path),
                "save_images_pt": lambda: zsq_fast.save_images(torch.randn(2, 3, SIZE, SIZE), path),
                "save_images_png": lambda: zsq_fast.save_images(torch.randn(2, 3, SIZE, SIZE),
                                                                path if kind != "dir" else d / "out.pt"),
                "export_onnx": lambda: zsq_fast.export_onnx(q, path, torch.randn(1, 3, SIZE, SIZE))}[what]
        r = outcome(call, ("path", "out.pt", "file", "PNG"))
        assert isinstance(r, (PathError, InvalidTypeError, InvalidArgumentError)), r
        assert files_in(d) == before, "a failed save left files behind"


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that dies half way (disk full) leaves neither a partial target nor a temp file."""
    q = tiny_quantized()
    zsq_fast.save_quantized(q, tmp_path / "q.pt")
    good = (tmp_path / "q.pt").read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(PathError, match=r"cannot write quantized checkpoint .*q\.pt.*No space left"):
        zsq_fast.save_quantized(q, tmp_path / "q.pt")
    with pytest.raises(PathError, match="No space left"):
        zsq_fast.save_images(torch.randn(2, 3, SIZE, SIZE), tmp_path / "i.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]
    assert (tmp_path / "q.pt").read_bytes() == good  # the previous file is intact

    def png_dies(self, fp, *a, **kw):
        raise OSError(28, "No space left on device")

    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", png_dies)
    with pytest.raises(PathError, match="PNG folder"):
        zsq_fast.save_images(torch.randn(2, 3, SIZE, SIZE), tmp_path / "pngs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]


# ---------------------------------------------------------------- export_onnx
@FUZZ
@given(example=st.one_of(image_tensors(), odd_scalars),
       opset=st.one_of(st.sampled_from([13, 17, 12, 0]), odd_scalars))
def test_export_onnx_writes_a_model_or_names_the_argument(example, opset):
    q = tiny_quantized()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "q.onnx"
        r = outcome(lambda: zsq_fast.export_onnx(q, path, example, opset=opset), ("example_input", "opset"))
        if isinstance(r, ZsqFastError):
            assert files_in(d) == set()
        else:
            import onnx

            onnx.checker.check_model(onnx.load(str(path)))


# ---------------------------------------------------------------- CLI
_CLI: dict = {}


def cli_files() -> dict:
    if not _CLI:
        d = Path(tempfile.mkdtemp(prefix="zsq_fuzz_cli_"))
        torch.manual_seed(0)
        m = ZOO["digits_cnn"].factory().train()
        with torch.no_grad():
            for _ in range(2):
                m(torch.randn(8, 3, 16, 16))
        torch.save(m.eval().state_dict(), d / "w.pt")
        rng = np.random.default_rng(0)
        np.savez(d / "data.npz", x=rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8), y=np.arange(6) % 10)
        (d / "junk.pt").write_bytes(b"\x00garbage" * 20)
        (d / "text.npz").write_text("not an npz")
        raw = (d / "w.pt").read_bytes()
        (d / "cut.pt").write_bytes(raw[: len(raw) // 2])
        _CLI["dir"] = d
    return _CLI


FILE_ARGS = ["w.pt", "junk.pt", "text.npz", "cut.pt", "data.npz", "missing.pt", "", "nodir/x.pt"]
CLI_VALUES = {
    "--weights": st.sampled_from(FILE_ARGS),
    "--images": st.sampled_from(FILE_ARGS),
    "--data": st.sampled_from(FILE_ARGS),
    "--quantized": st.sampled_from(FILE_ARGS),
    "--bits": st.sampled_from(["W4A4", "W8A8", "W1A1", "W99A4", "abc", ""]),
    "--preset": st.sampled_from(["hw", "academic", "x"]),
    "--method": st.sampled_from(["nearest", "bns", "dgh", "x"]),
    "-n": st.sampled_from(["2", "0", "-1", "x", "1e99"]),
    "--iterations": st.sampled_from(["1", "0", "x"]),
    "--device": st.sampled_from(["cpu", "cuda:5", "bogus"]),
    "--precision": st.sampled_from(["fp32", "bf16", "int4"]),
    "--mean": st.sampled_from(["0.5,0.5,0.5", "nan,1,2", "1,2", "x"]),
    "--std": st.sampled_from(["0.5,0.5,0.5", "0,0,0", "-1", "x"]),
    "--input-size": st.sampled_from(["16", "0", "3", "x"]),
    "--model": st.sampled_from(["digits_cnn", "resnet20", "nosuch", "w.pt", "os:getcwd", "torchvision:nosuch"]),
    "--out": st.sampled_from(["out.pt", "nodir/out.pt", "w.pt/out.pt", "outdir"]),
    "--onnx": st.sampled_from(["q.onnx", "nodir/q.onnx", "w.pt/q.onnx"]),
    "--checkpoint": st.sampled_from(["junk.pt", "cut.pt", "ck.pt"]),
    "--eval": st.sampled_from(["data.npz", "text.npz", "missing.npz"]),
    "--generator": st.sampled_from(["bns", "fdda", "x"]),
    "--real": st.sampled_from(["data.npz", "text.npz"]),
}


@FUZZ
@given(command=st.sampled_from(["generate", "quantize", "eval", "nosuch"]),
       flags=st.dictionaries(st.sampled_from(sorted(CLI_VALUES)), st.none(), max_size=4), data=st.data())
def test_cli_exits_0_or_2_with_one_line(command, flags, data, capsys, monkeypatch):
    d = cli_files()["dir"]
    argv = {"--model": "digits_cnn", "--weights": "w.pt", "--no-progress": None}
    if command == "generate":
        argv |= {"--method": "bns", "-n": "2", "--iterations": "1", "--out": "out.pt"}
    elif command == "quantize":
        argv |= {"--images": "data.npz", "--method": "nearest", "--out": "out.pt"}
    elif command == "eval":
        argv |= {"--data": "data.npz"}
    for flag in flags:
        argv[flag] = data.draw(CLI_VALUES[flag], label=flag)
    paths = {"--weights", "--images", "--data", "--quantized", "--out", "--onnx", "--checkpoint", "--eval", "--real"}
    in_out = {"out.pt", "outdir", "nodir/out.pt", "q.onnx", "nodir/q.onnx", "ck.pt"}  # fresh paths: in the temp dir
    with tempfile.TemporaryDirectory() as out:
        args = [command]
        for k, v in argv.items():
            if v is None:
                args += [k]
            else:
                args += [k, str(Path(out) / v) if v in in_out else str(d / v) if k in paths and v else v]
        monkeypatch.delenv("ZSQ_FAST_DEBUG", raising=False)
        monkeypatch.chdir(out)  # `eval` without --quantized writes its report in the working folder
        code = main(args)
        _, err = capsys.readouterr()
        event(f"exit {code}")
        assert code in (0, 2), (args, err)
        if code == 2:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("zsq-fast: error: "), err
            monkeypatch.setenv("ZSQ_FAST_DEBUG", "1")  # the same run, now raising: a zsq_fast error type
            with pytest.raises(ZsqFastError):
                main(args)
            capsys.readouterr()
        assert not [p for p in files_in(out) if "tmp" in p], "temporary files left behind"


# ---------------------------------------------------------------- every file kind, cut short
def _cut(p: Path, keep: float = 0.5) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: int(len(raw) * keep)])


def test_truncated_files_of_every_kind_are_named(tmp_path):
    from zsq_fast.data import load_images_for

    zsq_fast.save_quantized(tiny_quantized(), tmp_path / "q.pt")
    _cut(tmp_path / "q.pt")
    with pytest.raises(FileFormatError, match=r"q\.pt' is not a zsq_fast quantized model checkpoint .*truncated"):
        zsq_fast.load_quantized(tmp_path / "q.pt", tiny_net())

    zsq_fast.save_images(torch.randn(2, 3, SIZE, SIZE), tmp_path / "i.pt")
    _cut(tmp_path / "i.pt")
    with pytest.raises(FileFormatError, match=r"i\.pt' is not a zsq_fast images file"):
        zsq_fast.load_images(tmp_path / "i.pt")

    zsq_fast.save_images(torch.randn(2, 3, SIZE, SIZE), tmp_path / "pngs")
    _cut(tmp_path / "pngs" / "00001.png")
    with pytest.raises(FileFormatError, match=r"00001\.png' is not a readable PNG"):
        zsq_fast.load_images(tmp_path / "pngs")

    np.savez(tmp_path / "d.npz", x=np.zeros((4, SIZE, SIZE, 3), np.uint8))
    _cut(tmp_path / "d.npz", 0.8)
    with pytest.raises(FileFormatError, match=r"d\.npz.*truncated or corrupted"):
        load_images_for(str(tmp_path / "d.npz"), [0.5] * 3, [0.25] * 3, SIZE)

    ckpt = tmp_path / "gen.ckpt"
    zsq_fast.generate(tiny_net(), 3, "bns", SIZE, iterations=1, checkpoint=ckpt)
    _cut(ckpt)
    with pytest.raises(FileFormatError, match=r"gen\.ckpt' is not a zsq_fast generation checkpoint"):
        zsq_fast.generate(tiny_net(), 3, "bns", SIZE, iterations=2, checkpoint=ckpt)
    torch.save({"settings": "{}"}, ckpt)  # a torch file, but not one of ours
    with pytest.raises(FileFormatError, match="missing or unreadable"):
        zsq_fast.generate(tiny_net(), 3, "bns", SIZE, iterations=2, checkpoint=ckpt)


def test_a_flipped_bit_in_a_quantized_checkpoint_is_caught(tmp_path):
    """torch's zip reader does not check the pickled config: the SHA-256 in the file does."""
    zsq_fast.save_quantized(tiny_quantized(), tmp_path / "q.pt")
    raw = bytearray((tmp_path / "q.pt").read_bytes())
    at = raw.index(b'"bits": 4')
    raw[at + 8] = ord("5")  # W4 -> W5 in the config: still valid JSON, a different model
    (tmp_path / "q.pt").write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="does not match its SHA-256 checksum"):
        zsq_fast.load_quantized(tmp_path / "q.pt", tiny_net())


def test_error_types_keep_the_builtin_bases():
    """Existing `except ValueError/TypeError/FileNotFoundError` callers keep working."""
    from zsq_fast import errors

    assert issubclass(errors.InvalidArgumentError, ValueError)
    assert issubclass(errors.FileFormatError, ValueError) and issubclass(errors.NonFiniteError, ValueError)
    assert issubclass(errors.InvalidTypeError, TypeError)
    assert issubclass(errors.MissingFileError, FileNotFoundError) and issubclass(errors.PathError, OSError)
    from zsq_fast.generate import NonFiniteLossError
    assert issubclass(NonFiniteLossError, errors.NonFiniteError)
    assert all(issubclass(getattr(errors, n), errors.ZsqFastError) for n in errors.__all__)


def test_atomic_writes_keep_the_usual_file_modes(tmp_path):
    """The temporary file/folder is renamed into place: it must not carry mkstemp's private 0600 mode."""
    umask = os.umask(0)
    os.umask(umask)
    zsq_fast.save_quantized(tiny_quantized(), tmp_path / "q.pt")
    zsq_fast.save_images(torch.randn(2, 3, SIZE, SIZE), tmp_path / "pngs")
    assert (tmp_path / "q.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "pngs").stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pngs", "q.pt"]


@FUZZ
@given(images=st.one_of(image_tensors(), odd_scalars),
       labels=st.one_of(st.none(), st.lists(st.integers(-3, 20), max_size=5).map(torch.tensor),
                        st.just(torch.zeros(3)), odd_scalars),
       mean=st.one_of(st.just([0.5, 0.5, 0.5]), st.lists(st.one_of(st.floats(-1, 1), nonfinite), max_size=4),
                      odd_scalars),
       std=st.one_of(st.just([0.25, 0.25, 0.25]), st.lists(st.one_of(st.floats(-1, 1), nonfinite), max_size=4),
                     odd_scalars),
       as_png=st.booleans())
def test_save_images_round_trips_or_names_the_argument(images, labels, mean, std, as_png):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("pngs" if as_png else "i.pt")
        r = outcome(lambda: zsq_fast.save_images(images, path, labels=labels, mean=mean, std=std),
                    ("images", "labels", "mean", "std", "PNG"))
        if isinstance(r, ZsqFastError):
            assert files_in(d) == set(), "a failed save left files behind"
            return
        back, back_labels = zsq_fast.load_images(path, mean=mean, std=std, with_labels=True)
        assert back.shape == images.shape and bool(torch.isfinite(back).all())
        if not as_png:
            assert torch.equal(back, images.float())
        else:  # 8-bit pixels: exact up to half a step, within the valid pixel range
            s = torch.tensor(std).view(1, -1, 1, 1)
            m = torch.tensor(mean).view(1, -1, 1, 1)
            want = (images.float() * s + m).clamp(0, 1)
            assert torch.allclose(back * s + m, want, atol=0.5 / 255 + 1e-5)
        assert (back_labels is None) == (labels is None)


@FUZZ
@given(model=st.sampled_from(["same", "other_width", "sequential", "str", "none"]))
def test_load_quantized_needs_the_float_architecture(model):
    with tempfile.TemporaryDirectory() as d:
        zsq_fast.save_quantized(tiny_quantized(), Path(d) / "q.pt")
        other = TinyNet()
        other.fc = nn.Linear(4, 5)
        m = {"same": tiny_net(1), "other_width": other, "sequential": nn.Sequential(nn.Conv2d(3, 4, 3)),
             "str": "TinyNet", "none": None}[model]
        r = outcome(lambda: zsq_fast.load_quantized(Path(d) / "q.pt", m), ("model",))
        assert isinstance(r, ZsqFastError) != (model == "same")
        if model == "same":
            check_quantized(r)
            x = torch.randn(3, 3, SIZE, SIZE)
            assert torch.equal(r(x), tiny_quantized()(x))  # the saved weights, not the float model's

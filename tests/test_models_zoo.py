import sys

import pytest
import torch
from torch import nn

from zsq_fast.models.zoo import ZOO, has_batchnorm, load_model, read_state_dict


def test_zoo_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ZOO["digits_cnn"].factory()
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    loaded = load_model("digits_cnn", str(path))
    assert loaded.input_size == 16 and loaded.num_classes == 10 and not loaded.model.training
    x = torch.randn(2, 3, 16, 16)
    m.eval()
    assert torch.equal(loaded.model(x), m(x))


def test_wrapped_and_prefixed_state_dict_is_unwrapped(tmp_path):
    m = ZOO["digits_cnn"].factory()
    sd = {f"module.{k}": v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "best_prec1": 1.0}, path)
    assert set(read_state_dict(str(path))) == set(sd_key[len("module."):] for sd_key in sd)
    load_model("digits_cnn", str(path))  # old checkpoints without num_batches_tracked load too


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(ZOO["digits_cnn"].factory().state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit architecture resnet20: missing keys: conv1.weight"):
        load_model("resnet20", str(path))
    sd = ZOO["resnet20"].factory().state_dict()
    sd["linear.weight"] = torch.zeros(100, 64)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"shape mismatch: linear.weight \(100, 64\) vs \(10, 64\)"):
        load_model("resnet20", str(path))


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "t.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(ValueError, match="not a state dict"):
        load_model("resnet20", str(p))
    p.write_text("garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_model("resnet20", str(p))
    with pytest.raises(FileNotFoundError):
        load_model("resnet20", str(tmp_path / "missing.pt"))


def test_torchvision_random_init_and_bad_enum_never_download():
    tv = load_model("torchvision:resnet18")
    assert tv.input_size == 224 and tv.num_classes == 1000 and has_batchnorm(tv.model)
    with pytest.raises(ValueError, match="has no weights 'NOPE'.*IMAGENET1K_V1"):
        load_model("resnet18", "NOPE")
    with pytest.raises(ValueError, match="no classification model"):
        load_model("torchvision:not_a_net")


def test_torchscript_file(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    m(torch.zeros(1, 3, 8, 8))
    p = tmp_path / "m.ts"
    torch.jit.script(m).save(str(p))
    loaded = load_model(str(p), input_size=8, mean=[0.5], std=[0.25, 0.25, 0.25])
    assert loaded.source.startswith("torchscript:") and loaded.mean == (0.5, 0.5, 0.5)
    assert loaded.model(torch.zeros(2, 3, 8, 8)).shape == (2, 5)
    plain = tmp_path / "sd.pt"
    torch.save(m.state_dict(), plain)
    with pytest.raises(ValueError, match="not a TorchScript archive.*--weights"):
        load_model(str(plain))


def test_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))\n"
        "    m.input_size = 8\n"
        "    return m\n"
        "def not_a_module():\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    loaded = load_model("my_models:make")
    assert loaded.input_size == 8 and loaded.source == "factory:my_models:make"
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        load_model("my_models:not_a_module")
    with pytest.raises(ValueError, match="cannot import factory"):
        load_model("my_models:missing")


def test_unknown_spec_and_bad_overrides():
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        load_model("resnet21")
    with pytest.raises(ValueError, match="std must be positive"):
        load_model("resnet20", std=[0.0])
    with pytest.raises(ValueError, match="mean needs 1 or 3 values"):
        load_model("resnet20", mean=[0.1, 0.2])


def test_real_cifar_weights_load_strict(shared_data):
    loaded = load_model("resnet56", str(shared_data / "weights" / "cifar10_resnet56.pt"))
    assert sum(p.numel() for p in loaded.model.parameters()) == 853_018

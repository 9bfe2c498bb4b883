"""Which implementation serves each op, and the dispatcher's device routing of torch.ops.zsq_fast.*."""
import pytest
import torch

from zsq_fast import ops
from zsq_fast.ops._backend import _C


def test_backend_report_shape():
    report = ops.backend()
    assert set(report) == {"channel_stats", "fake_quant", "adaround"}
    for per_device in report.values():
        assert set(per_device) == {"cpu", "cuda"}
        assert set(per_device.values()) <= {"kernel", "reference"}


@pytest.mark.skipif(_C is None, reason="zsq_fast._C is not built (python setup.py build_ext --inplace)")
def test_kernel_on_cpu_when_built():
    assert ops.has_cpu_kernels()
    assert all(v["cpu"] == "kernel" for v in ops.backend().values())
    cuda = "kernel" if _C.cuda_compiled() else "reference"
    assert all(v["cuda"] == cuda for v in ops.backend().values())


@pytest.mark.skipif(_C is not None, reason="the extension is built; this checks the fallback")
def test_reference_everywhere_when_not_built():
    assert not ops.has_cpu_kernels() and not ops.has_cuda_kernels()
    assert all(v == {"cpu": "reference", "cuda": "reference"} for v in ops.backend().values())
    out = torch.ops.zsq_fast.fake_quant(torch.tensor([0.26]), torch.tensor([0.5]), torch.zeros(1), -8, 7, -1)
    assert float(out) == 0.5  # the operators exist without the build, served by the references


@pytest.mark.skipif(not torch.cuda.is_available() or ops.has_cuda_kernels(),
                    reason="needs a GPU and a build without CUDA kernels")
def test_cpu_only_build_serves_cuda_tensors_with_the_reference():
    x = torch.randn(4, 3, device="cuda")
    out = torch.ops.zsq_fast.fake_quant(x, torch.full((1,), 0.1, device="cuda"), torch.zeros(1, device="cuda"),
                                        -8, 7, -1)
    assert out.device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_are_refused_with_a_clear_error():
    x = torch.ones(2, 3, device="cuda")
    with pytest.raises(ValueError, match="x is on cuda.* but scale is on cpu"):
        torch.ops.zsq_fast.fake_quant(x, torch.ones(1), torch.zeros(1, device="cuda"), -8, 7, -1)

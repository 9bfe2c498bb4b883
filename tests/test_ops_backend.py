"""Which implementation serves each op, and the extension's device dispatch."""
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


@pytest.mark.skipif(_C is None or _C.cuda_compiled() or not torch.cuda.is_available(),
                    reason="needs a CPU-only build of _C and a GPU")
def test_cpu_only_build_refuses_cuda_tensors():
    with pytest.raises(RuntimeError, match="without CUDA"):
        _C.fake_quant_forward(torch.ones(2, device="cuda"), torch.ones(1, device="cuda"),
                              torch.zeros(1, device="cuda"), -8, 7, -1)


@pytest.mark.skipif(_C is None, reason="zsq_fast._C is not built (python setup.py build_ext --inplace)")
def test_mixed_devices_and_unsupported_device_are_refused():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="meta"):
        _C.fake_quant_forward(x.to("meta"), torch.ones(1, device="meta"), torch.zeros(1, device="meta"), -8, 7, -1)
    with pytest.raises(ValueError, match="is on"):
        _C.fake_quant_forward(x, torch.ones(1, device="meta"), torch.zeros(1), -8, 7, -1)

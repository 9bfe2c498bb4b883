// Registers the zsq_fast operators with the PyTorch dispatcher: schemas (TORCH_LIBRARY), argument
// checks, and the CPU and CUDA kernels (TORCH_LIBRARY_IMPL). torch.ops.zsq_fast.<op> then picks the
// kernel by device with no Python glue. Fake (meta) kernels and autograd are registered in Python
// (zsq_fast/ops/), where torch.compile looks for them; the schemas are mirrored in
// zsq_fast/ops/_library.py (a test keeps the two equal).
//
// Per-call checks read shapes, dtypes and devices only: never a tensor's values, which would
// synchronize with the GPU (values are validated once, when quantizers are set up).
#include <torch/extension.h>
#include <torch/library.h>

#include "adaround/adaround.h"
#include "channel_stats/channel_stats.h"
#include "common.h"
#include "fake_quant/fake_quant.h"

namespace zsq {
namespace {

void check_activation(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have shape (N, C, *spatial), got ", x.sizes());
}

void check_channel_vector(const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_float(t, name);
  check_same_device(x, t, "x", name);
  TORCH_CHECK_VALUE(t.numel() == x.size(1), name, " has ", t.numel(), " elements, x has ", x.size(1), " channels");
}

void check_stats(const at::Tensor& x, const std::optional<at::Tensor>& running, double running_count) {
  check_activation(x);
  if (running.has_value() && running->defined()) {
    check_float(*running, "running");
    check_same_device(x, *running, "x", "running");
    TORCH_CHECK_VALUE(running->dim() == 2 && running->size(0) == 2 && running->size(1) == x.size(1),
                      "running must have shape (2, ", x.size(1), ") (mean, M2), got ", running->sizes());
  }
  TORCH_CHECK_VALUE(running_count >= 0, "running_count must be >= 0, got ", running_count);
}

void check_stats_backward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                          const at::Tensor& grad_var, double total_count, const std::optional<at::Tensor>& scale) {
  check_activation(x);
  check_channel_vector(x, mean, "mean");
  check_channel_vector(x, grad_mean, "grad_mean");
  check_channel_vector(x, grad_var, "grad_var");
  TORCH_CHECK_VALUE(total_count > 0, "total_count must be > 0, got ", total_count);
  if (scale.has_value() && scale->defined()) {
    check_float(*scale, "grad_scale");
    check_same_device(x, *scale, "x", "grad_scale");
    TORCH_CHECK_VALUE(scale->numel() == 1, "grad_scale must hold one element, got ", scale->numel());
  }
}

void check_fake_quant_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t axis) {
  check_float(x, "x");
  check_float(grad, "grad");
  check_same_device(x, grad, "x", "grad");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "grad has shape ", grad.sizes(), ", x has ", x.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad has dtype ", grad.scalar_type(), ", x has ",
                   x.scalar_type());
  check_qparams(x, scale, zero_point, qmin, qmax, axis);
}

void check_adaround(const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                    int64_t qmin, int64_t qmax, int64_t axis, double beta) {
  check_float(w, "w");
  check_float(v, "v");
  check_same_device(w, v, "w", "v");
  TORCH_CHECK_VALUE(v.sizes() == w.sizes(), "v has shape ", v.sizes(), ", w has ", w.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == w.scalar_type(), "v has dtype ", v.scalar_type(), ", w has ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(beta >= 1.0, "beta must be >= 1, got ", beta);
  check_qparams(w, scale, zero_point, qmin, qmax, axis);
}

void check_adaround_backward(const at::Tensor& grad_w_hat, const at::Tensor& grad_reg, const at::Tensor& w,
                             const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t qmin, int64_t qmax, int64_t axis, double beta) {
  check_adaround(w, v, scale, zero_point, qmin, qmax, axis, beta);
  check_float(grad_w_hat, "grad_w_hat");
  check_same_device(w, grad_w_hat, "w", "grad_w_hat");
  TORCH_CHECK_VALUE(grad_w_hat.sizes() == w.sizes(), "grad_w_hat has shape ", grad_w_hat.sizes(), ", w has ",
                    w.sizes());
  TORCH_CHECK_TYPE(grad_w_hat.scalar_type() == w.scalar_type(), "grad_w_hat has dtype ", grad_w_hat.scalar_type(),
                   ", w has ", w.scalar_type());
  check_float(grad_reg, "grad_reg");
  check_same_device(w, grad_reg, "w", "grad_reg");
  TORCH_CHECK_VALUE(grad_reg.numel() == 1, "grad_reg must hold one element, got ", grad_reg.numel());
}

// ---------------------------------------------------------------- checked entry points, one per op and device
template <auto Kernel>
at::Tensor channel_stats_op(const at::Tensor& x, const std::optional<at::Tensor>& running, double running_count) {
  check_stats(x, running, running_count);
  return Kernel(x, running, running_count);
}

template <auto Kernel>
at::Tensor channel_stats_backward_op(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                     const at::Tensor& grad_var, double total_count,
                                     const std::optional<at::Tensor>& grad_scale) {
  check_stats_backward(x, mean, grad_mean, grad_var, total_count, grad_scale);
  return Kernel(x, mean, grad_mean, grad_var, total_count, grad_scale);
}

template <auto Kernel>
at::Tensor fake_quant_op(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                         int64_t qmax, int64_t axis) {
  check_float(x, "x");
  check_qparams(x, scale, zero_point, qmin, qmax, axis);
  return Kernel(x, scale, zero_point, qmin, qmax, axis);
}

template <auto Kernel>
std::tuple<at::Tensor, at::Tensor> fake_quant_backward_op(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& scale, const at::Tensor& zero_point,
                                                          int64_t qmin, int64_t qmax, int64_t axis,
                                                          bool need_scale_grad) {
  check_fake_quant_backward(grad, x, scale, zero_point, qmin, qmax, axis);
  return Kernel(grad, x, scale, zero_point, qmin, qmax, axis, need_scale_grad);
}

template <auto Kernel>
std::tuple<at::Tensor, at::Tensor> adaround_op(const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale,
                                               const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t axis,
                                               bool hard, double beta, bool compute_reg) {
  check_adaround(w, v, scale, zero_point, qmin, qmax, axis, beta);
  return Kernel(w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg);
}

template <auto Kernel>
at::Tensor adaround_backward_op(const at::Tensor& grad_w_hat, const at::Tensor& grad_reg, const at::Tensor& w,
                                const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                                int64_t qmin, int64_t qmax, int64_t axis, double beta) {
  check_adaround_backward(grad_w_hat, grad_reg, w, v, scale, zero_point, qmin, qmax, axis, beta);
  return Kernel(grad_w_hat, grad_reg, w, v, scale, zero_point, qmin, qmax, axis, beta);
}

bool cuda_compiled() {
#ifdef ZSQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace zsq

TORCH_LIBRARY(zsq_fast, m) {
  m.def("channel_stats(Tensor x, Tensor? running=None, float running_count=0.) -> Tensor");
  m.def("channel_stats_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var, float total_count, "
        "Tensor? grad_scale=None) -> Tensor");
  m.def("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis) -> Tensor");
  m.def("fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, "
        "bool need_scale_grad) -> (Tensor, Tensor)");
  m.def("adaround(Tensor w, Tensor v, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, bool hard, "
        "float beta, bool compute_reg) -> (Tensor, Tensor)");
  m.def("adaround_backward(Tensor grad_w_hat, Tensor grad_reg, Tensor w, Tensor v, Tensor scale, Tensor zero_point, "
        "int qmin, int qmax, int axis, float beta) -> Tensor");
}

TORCH_LIBRARY_IMPL(zsq_fast, CPU, m) {
  m.impl("channel_stats", &zsq::channel_stats_op<zsq::channel_stats_forward_cpu>);
  m.impl("channel_stats_backward", &zsq::channel_stats_backward_op<zsq::channel_stats_backward_cpu>);
  m.impl("fake_quant", &zsq::fake_quant_op<zsq::fake_quant_forward_cpu>);
  m.impl("fake_quant_backward", &zsq::fake_quant_backward_op<zsq::fake_quant_backward_cpu>);
  m.impl("adaround", &zsq::adaround_op<zsq::adaround_forward_cpu>);
  m.impl("adaround_backward", &zsq::adaround_backward_op<zsq::adaround_backward_cpu>);
}

#ifdef ZSQ_WITH_CUDA
TORCH_LIBRARY_IMPL(zsq_fast, CUDA, m) {
  m.impl("channel_stats", &zsq::channel_stats_op<zsq::channel_stats_forward_cuda>);
  m.impl("channel_stats_backward", &zsq::channel_stats_backward_op<zsq::channel_stats_backward_cuda>);
  m.impl("fake_quant", &zsq::fake_quant_op<zsq::fake_quant_forward_cuda>);
  m.impl("fake_quant_backward", &zsq::fake_quant_backward_op<zsq::fake_quant_backward_cuda>);
  m.impl("adaround", &zsq::adaround_op<zsq::adaround_forward_cuda>);
  m.impl("adaround_backward", &zsq::adaround_backward_op<zsq::adaround_backward_cuda>);
}
#endif

// The Python module only loads the library (and says whether CUDA kernels are in it).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zsq_fast kernels, registered as torch.ops.zsq_fast.*";
  m.def("cuda_compiled", &zsq::cuda_compiled, "True when the CUDA kernels were compiled in");
}

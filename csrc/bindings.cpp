// The one Python binding of zsq_fast._C: argument checks, then the CPU kernel or, when built
// with ZSQ_WITH_CUDA, the CUDA kernel for tensors on a GPU.
#include <torch/extension.h>

#include "adaround/adaround.h"
#include "channel_stats/channel_stats.h"
#include "common.h"
#include "fake_quant/fake_quant.h"

namespace zsq {
namespace {

bool cuda_compiled() {
#ifdef ZSQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// true: run the CUDA kernel; false: the CPU kernel; other devices are refused.
bool on_cuda(const at::Tensor& t, const char* op) {
  if (t.device().is_cpu()) return false;
  if (t.device().is_cuda()) {
    TORCH_CHECK(cuda_compiled(), op, ": zsq_fast._C was built without CUDA kernels; rebuild it where nvcc is "
                "available (ZSQ_FAST_CUDA=1) or use the reference ops");
    return true;
  }
  TORCH_CHECK_VALUE(false, op, ": unsupported device ", t.device(), " (cpu or cuda)");
  return false;
}

void check_activation(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have shape (N, C, *spatial), got ", x.sizes());
}

at::Tensor channel_stats_forward(const at::Tensor& x) {
  check_activation(x);
#ifdef ZSQ_WITH_CUDA
  if (on_cuda(x, "channel_stats_forward")) return channel_stats_forward_cuda(x);
#else
  on_cuda(x, "channel_stats_forward");
#endif
  return channel_stats_forward_cpu(x);
}

at::Tensor channel_stats_backward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& grad_mean,
                                  const at::Tensor& grad_var, double total_count) {
  check_activation(x);
  const int64_t C = x.size(1);
  const std::pair<const at::Tensor*, const char*> vecs[] = {{&mean, "mean"}, {&grad_mean, "grad_mean"},
                                                           {&grad_var, "grad_var"}};
  for (const auto& [t, name] : vecs) {
    check_float(*t, name);
    check_same_device(x, *t, "x", name);
    TORCH_CHECK_VALUE(t->numel() == C, name, " has ", t->numel(), " elements, x has ", C, " channels");
  }
  TORCH_CHECK_VALUE(total_count > 0, "total_count must be > 0, got ", total_count);
#ifdef ZSQ_WITH_CUDA
  if (on_cuda(x, "channel_stats_backward"))
    return channel_stats_backward_cuda(x, mean, grad_mean, grad_var, total_count);
#else
  on_cuda(x, "channel_stats_backward");
#endif
  return channel_stats_backward_cpu(x, mean, grad_mean, grad_var, total_count);
}

at::Tensor fake_quant_forward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                              int64_t qmin, int64_t qmax, int64_t axis) {
  check_float(x, "x");
  check_qparams(x, scale, zero_point, qmin, qmax, axis);
#ifdef ZSQ_WITH_CUDA
  if (on_cuda(x, "fake_quant_forward")) return fake_quant_forward_cuda(x, scale, zero_point, qmin, qmax, axis);
#else
  on_cuda(x, "fake_quant_forward");
#endif
  return fake_quant_forward_cpu(x, scale, zero_point, qmin, qmax, axis);
}

std::tuple<at::Tensor, at::Tensor> fake_quant_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& scale, const at::Tensor& zero_point,
                                                       int64_t qmin, int64_t qmax, int64_t axis,
                                                       bool need_scale_grad) {
  check_float(x, "x");
  check_float(grad, "grad");
  check_same_device(x, grad, "x", "grad");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "grad has shape ", grad.sizes(), ", x has ", x.sizes());
  check_qparams(x, scale, zero_point, qmin, qmax, axis);
  const at::Tensor g = grad.to(x.scalar_type());
#ifdef ZSQ_WITH_CUDA
  if (on_cuda(x, "fake_quant_backward"))
    return fake_quant_backward_cuda(g, x, scale, zero_point, qmin, qmax, axis, need_scale_grad);
#else
  on_cuda(x, "fake_quant_backward");
#endif
  return fake_quant_backward_cpu(g, x, scale, zero_point, qmin, qmax, axis, need_scale_grad);
}

void check_adaround(const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale,
                    const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t axis, double beta) {
  check_float(w, "w");
  check_float(v, "v");
  check_same_device(w, v, "w", "v");
  TORCH_CHECK_VALUE(v.sizes() == w.sizes(), "v has shape ", v.sizes(), ", w has ", w.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == w.scalar_type(), "v has dtype ", v.scalar_type(), ", w has ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(beta >= 1.0, "beta must be >= 1, got ", beta);
  check_qparams(w, scale, zero_point, qmin, qmax, axis);
}

std::tuple<at::Tensor, at::Tensor> adaround_forward(const at::Tensor& w, const at::Tensor& v,
                                                    const at::Tensor& scale, const at::Tensor& zero_point,
                                                    int64_t qmin, int64_t qmax, int64_t axis, bool hard,
                                                    double beta, bool compute_reg) {
  check_adaround(w, v, scale, zero_point, qmin, qmax, axis, beta);
#ifdef ZSQ_WITH_CUDA
  if (on_cuda(w, "adaround_forward"))
    return adaround_forward_cuda(w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg);
#else
  on_cuda(w, "adaround_forward");
#endif
  return adaround_forward_cpu(w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg);
}

at::Tensor adaround_backward(const at::Tensor& grad_w_hat, const at::Tensor& grad_reg, const at::Tensor& w,
                             const at::Tensor& v, const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t qmin, int64_t qmax, int64_t axis, double beta) {
  check_adaround(w, v, scale, zero_point, qmin, qmax, axis, beta);
  check_float(grad_w_hat, "grad_w_hat");
  check_same_device(w, grad_w_hat, "w", "grad_w_hat");
  TORCH_CHECK_VALUE(grad_w_hat.sizes() == w.sizes(), "grad_w_hat has shape ", grad_w_hat.sizes(), ", w has ",
                    w.sizes());
  check_float(grad_reg, "grad_reg");
  check_same_device(w, grad_reg, "w", "grad_reg");
  TORCH_CHECK_VALUE(grad_reg.numel() == 1, "grad_reg must hold one element, got ", grad_reg.numel());
  const at::Tensor g = grad_w_hat.to(w.scalar_type());
  const at::Tensor gr = grad_reg.reshape({}).to(compute_dtype(w.scalar_type()));
#ifdef ZSQ_WITH_CUDA
  if (on_cuda(w, "adaround_backward"))
    return adaround_backward_cuda(g, gr, w, v, scale, zero_point, qmin, qmax, axis, beta);
#else
  on_cuda(w, "adaround_backward");
#endif
  return adaround_backward_cpu(g, gr, w, v, scale, zero_point, qmin, qmax, axis, beta);
}

}  // namespace
}  // namespace zsq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zsq_fast fused kernels: channel statistics, fake quantization, AdaRound (CPU and CUDA)";
  m.def("cuda_compiled", &zsq::cuda_compiled, "True when the CUDA kernels were compiled in");
  m.def("channel_stats_forward", &zsq::channel_stats_forward, py::arg("x"),
        "Per-channel (mean, M2) of x (N, C, *spatial) as a (2, C) float64 tensor");
  m.def("channel_stats_backward", &zsq::channel_stats_backward, py::arg("x"), py::arg("mean"),
        py::arg("grad_mean"), py::arg("grad_var"), py::arg("total_count"),
        "dL/dx = grad_mean/M + grad_var * 2 (x - mean)/M, in x's dtype and memory format");
  m.def("fake_quant_forward", &zsq::fake_quant_forward, py::arg("x"), py::arg("scale"), py::arg("zero_point"),
        py::arg("qmin"), py::arg("qmax"), py::arg("axis"),
        "s (clamp(round(x/s) + z, qmin, qmax) - z); axis -1 = per-tensor");
  m.def("fake_quant_backward", &zsq::fake_quant_backward, py::arg("grad"), py::arg("x"), py::arg("scale"),
        py::arg("zero_point"), py::arg("qmin"), py::arg("qmax"), py::arg("axis"), py::arg("need_scale_grad"),
        "(straight-through grad_x, LSQ grad_scale) in one pass");
  m.def("adaround_forward", &zsq::adaround_forward, py::arg("w"), py::arg("v"), py::arg("scale"),
        py::arg("zero_point"), py::arg("qmin"), py::arg("qmax"), py::arg("axis"), py::arg("hard"),
        py::arg("beta"), py::arg("compute_reg"), "(w_hat, reg) of AdaRound in one pass");
  m.def("adaround_backward", &zsq::adaround_backward, py::arg("grad_w_hat"), py::arg("grad_reg"), py::arg("w"),
        py::arg("v"), py::arg("scale"), py::arg("zero_point"), py::arg("qmin"), py::arg("qmax"), py::arg("axis"),
        py::arg("beta"), "dL/dV of the data term and the regularizer in one pass");
}

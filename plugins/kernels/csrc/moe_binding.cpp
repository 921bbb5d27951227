// torch binding of moe_kernels.cu (the `cuda` kernel backend): checks and dtype dispatch; built by
// torch.utils.cpp_extension.load at first use (rapid.builtin.kernels.cuda_kernels). The caller passes
// torch.cuda.current_stream().cuda_stream, so this file needs no c10/cuda header: those of a CPU build
// of torch are incomplete (c10/cuda/impl/cuda_cmake_macros.h is missing), and CI checks this file's
// syntax against one.
#include <torch/extension.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moe_kernels.cuh"

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename F>
void by_dtype(const torch::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case torch::kFloat: f(static_cast<float*>(nullptr)); break;
    case torch::kHalf: f(static_cast<__half*>(nullptr)); break;
    case torch::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "rapid cuda kernels: dtype ", t.scalar_type(), " (fp32, fp16, bf16 only)");
  }
}

template <typename T> T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void launched(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "rapid cuda kernel ", kernel, " failed to launch: ", cudaGetErrorString(err));
}

}  // namespace

torch::Tensor gather_rows(torch::Tensor src, torch::Tensor idx, int64_t stream) {
  check(src, "src"); check(idx, "idx");
  auto out = torch::empty({idx.numel(), src.size(1)}, src.options());
  by_dtype(src, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rapid_moe::gather_rows<T>(ptr<T>(src), idx.data_ptr<int64_t>(), ptr<T>(out), idx.numel(), src.size(1), as_stream(stream));
    launched("gather_rows");
  });
  return out;
}

torch::Tensor combine_rows(torch::Tensor src, torch::Tensor row_of_slot, c10::optional<torch::Tensor> w_slots,
                           int64_t tokens, int64_t k, int64_t stream) {
  check(src, "src"); check(row_of_slot, "row_of_slot");
  auto out = torch::empty({tokens, src.size(1)}, src.options());
  by_dtype(src, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* w = w_slots ? ptr<T>(*w_slots) : nullptr;
    rapid_moe::combine_rows<T>(ptr<T>(src), row_of_slot.data_ptr<int64_t>(), w, ptr<T>(out), tokens, src.size(1),
                               static_cast<int>(k), as_stream(stream));
    launched("combine_rows");
  });
  return out;
}

std::vector<torch::Tensor> scale_rows_dot(torch::Tensor g, torch::Tensor y, torch::Tensor token_of_row,
                                          torch::Tensor w_row, int64_t stream) {
  check(g, "g"); check(y, "y"); check(token_of_row, "token_of_row"); check(w_row, "w_row");
  auto dy = torch::empty_like(y);
  auto dw = torch::empty({y.size(0)}, y.options().dtype(torch::kFloat));
  by_dtype(y, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rapid_moe::scale_rows_dot<T>(ptr<T>(g), ptr<T>(y), token_of_row.data_ptr<int64_t>(), ptr<T>(w_row), ptr<T>(dy),
                                 dw.data_ptr<float>(), y.size(0), y.size(1), as_stream(stream));
    launched("scale_rows_dot");
  });
  return {dy, dw};
}

std::vector<torch::Tensor> softmax_topk(torch::Tensor logits, int64_t k, int64_t stream) {
  check(logits, "logits");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat, "softmax_topk takes fp32 logits");
  TORCH_CHECK(k >= 1 && k <= logits.size(1), "softmax_topk: k = ", k, " with ", logits.size(1), " experts");
  const auto T = logits.size(0), E = logits.size(1);
  auto probs = torch::empty_like(logits);
  auto top = torch::empty({T, k}, logits.options().dtype(torch::kLong));
  auto gates = torch::empty({T, k}, logits.options());
  rapid_moe::softmax_topk(logits.data_ptr<float>(), probs.data_ptr<float>(), top.data_ptr<int64_t>(),
                          gates.data_ptr<float>(), T, static_cast<int>(E), static_cast<int>(k), as_stream(stream));
  launched("softmax_topk");
  return {probs, top, gates};
}

torch::Tensor block_histogram(torch::Tensor keys, int64_t buckets, int64_t stream) {
  check(keys, "keys");
  const int64_t blocks = std::max<int64_t>((keys.numel() + rapid_moe::kSortBlock - 1) / rapid_moe::kSortBlock, 1);
  auto hist = torch::zeros({blocks, buckets}, keys.options());
  rapid_moe::block_histogram(keys.data_ptr<int64_t>(), hist.data_ptr<int64_t>(), keys.numel(),
                             static_cast<int>(buckets), as_stream(stream));
  launched("block_histogram");
  return hist;
}

torch::Tensor block_scatter(torch::Tensor keys, torch::Tensor base, int64_t buckets, int64_t stream) {
  check(keys, "keys"); check(base, "base");
  auto order = torch::empty({keys.numel()}, keys.options());
  rapid_moe::block_scatter(keys.data_ptr<int64_t>(), base.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                           keys.numel(), static_cast<int>(buckets), as_stream(stream));
  launched("block_scatter");
  return order;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_rows", &gather_rows);
  m.def("combine_rows", &combine_rows);
  m.def("scale_rows_dot", &scale_rows_dot);
  m.def("softmax_topk", &softmax_topk);
  m.def("block_histogram", &block_histogram);
  m.def("block_scatter", &block_scatter);
}

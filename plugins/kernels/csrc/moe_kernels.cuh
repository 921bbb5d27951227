// CUDA kernels of rapid's MoE hot path (the `cuda` kernel backend). Plain CUDA C++: no torch headers,
// so CI compiles this file with nvcc on machines without a GPU. The torch binding is moe_binding.cpp.
//
// route:     softmax_topk (one thread per token: fp32 softmax over E logits, k rounds of argmax)
// the order: a stable counting sort in two passes, block_histogram then block_scatter (the scan
//            between them is torch.cumsum); no comparison sort, deterministic
// permute:   gather_rows   out[i] = src[idx[i]]
// unpermute: combine_rows  out[t] = sum_k w[t,k] * src[row_of_slot[t,k]] (fp32 accumulation), and
//            its backward scale_rows_dot: dy[r] = w[r] * g[t(r)], dw[r] = <g[t(r)], y[r]>
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace rapid_moe {

// scalar_t: float, __half or __nv_bfloat16 (converted through float)
template <typename scalar_t>
void gather_rows(const scalar_t* src, const int64_t* idx, scalar_t* out, int64_t n, int64_t d, cudaStream_t s);
template <typename scalar_t>
void combine_rows(const scalar_t* src, const int64_t* row_of_slot, const scalar_t* w_slots, scalar_t* out,
                  int64_t tokens, int64_t d, int k, cudaStream_t s);
template <typename scalar_t>
void scale_rows_dot(const scalar_t* g, const scalar_t* y, const int64_t* token_of_row, const scalar_t* w_row,
                    scalar_t* dy, float* dw, int64_t rows, int64_t d, cudaStream_t s);

void softmax_topk(const float* logits, float* probs, int64_t* top, float* gates, int64_t tokens, int experts,
                  int k, cudaStream_t s);
// keys in [0, buckets); hist is [blocks, buckets] with blocks = ceil(n / kSortBlock)
constexpr int kSortBlock = 256;
void block_histogram(const int64_t* keys, int64_t* hist, int64_t n, int buckets, cudaStream_t s);
void block_scatter(const int64_t* keys, const int64_t* base, int64_t* dest, int64_t n, int buckets, cudaStream_t s);

}  // namespace rapid_moe

// See moe_kernels.cuh. Compiled by torch.utils.cpp_extension at first use on a CUDA machine, and by
// nvcc -c in CI (tests/plugins/kernels/test_cuda_sources.py) where no GPU is present.
#include "moe_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cfloat>

namespace rapid_moe {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ idx,
                                   scalar_t* __restrict__ out, int64_t n, int64_t d) {
  const int64_t row = blockIdx.x;
  if (row >= n) return;
  const int64_t from = idx[row];
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    out[row * d + c] = from >= 0 ? src[from * d + c] : from_f<scalar_t>(0.f);
}

template <typename scalar_t>
__global__ void combine_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ row_of_slot,
                                    const scalar_t* __restrict__ w_slots, scalar_t* __restrict__ out,
                                    int64_t tokens, int64_t d, int k) {
  const int64_t t = blockIdx.x;
  if (t >= tokens) return;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < k; ++j) {
      const int64_t r = row_of_slot[t * k + j];
      if (r >= 0) acc += (w_slots ? to_f(w_slots[t * k + j]) : 1.f) * to_f(src[r * d + c]);
    }
    out[t * d + c] = from_f<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void scale_rows_dot_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                      const int64_t* __restrict__ token_of_row, const scalar_t* __restrict__ w_row,
                                      scalar_t* __restrict__ dy, float* __restrict__ dw, int64_t rows, int64_t d) {
  const int64_t r = blockIdx.x;
  if (r >= rows) return;
  const int64_t t = token_of_row[r];
  const float w = to_f(w_row[r]);
  float part = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float gv = to_f(g[t * d + c]);
    dy[r * d + c] = from_f<scalar_t>(w * gv);
    part += gv * to_f(y[r * d + c]);
  }
  __shared__ float sums[256];
  sums[threadIdx.x] = part;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {   // blockDim.x is a power of two
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) dw[r] = sums[0];
}

__global__ void softmax_topk_kernel(const float* __restrict__ logits, float* __restrict__ probs,
                                    int64_t* __restrict__ top, float* __restrict__ gates, int64_t tokens,
                                    int experts, int k) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  const float* z = logits + t * experts;
  float* p = probs + t * experts;
  float mx = -FLT_MAX;
  for (int e = 0; e < experts; ++e) mx = fmaxf(mx, z[e]);
  float sum = 0.f;
  for (int e = 0; e < experts; ++e) { p[e] = __expf(z[e] - mx); sum += p[e]; }
  for (int e = 0; e < experts; ++e) p[e] /= sum;
  for (int j = 0; j < k; ++j) {              // k rounds of argmax; ties go to the lower expert id
    int best = -1;
    float bv = -1.f;
    for (int e = 0; e < experts; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= top[t * k + i] == e;
      if (!taken && p[e] > bv) { bv = p[e]; best = e; }
    }
    if (best < 0) {                          // NaN probabilities match nothing: a valid, untaken id,
      bv = NAN;                              // and a NaN gate, so the token's output shows it
      for (int e = 0; e < experts && best < 0; ++e) {
        bool taken = false;
        for (int i = 0; i < j; ++i) taken |= top[t * k + i] == e;
        if (!taken) best = e;
      }
    }
    top[t * k + j] = best;
    gates[t * k + j] = bv;
  }
}

__global__ void block_histogram_kernel(const int64_t* __restrict__ keys, int64_t* __restrict__ hist, int64_t n,
                                       int buckets) {
  extern __shared__ int counts[];
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  const int64_t i = blockIdx.x * static_cast<int64_t>(kSortBlock) + threadIdx.x;
  if (i < n) atomicAdd(&counts[keys[i]], 1);   // counts only: the order of increments does not matter
  __syncthreads();
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) hist[blockIdx.x * static_cast<int64_t>(buckets) + b] = counts[b];
}

__global__ void block_scatter_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ base,
                                     int64_t* __restrict__ dest, int64_t n, int buckets) {
  __shared__ int64_t block_keys[kSortBlock];
  const int64_t first = blockIdx.x * static_cast<int64_t>(kSortBlock);
  const int64_t i = first + threadIdx.x;
  block_keys[threadIdx.x] = i < n ? keys[i] : -1;
  __syncthreads();
  if (i >= n) return;
  const int64_t key = block_keys[threadIdx.x];
  int rank = 0;                                  // earlier elements of this block with the same key: stable
  for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += block_keys[j] == key;
  dest[base[blockIdx.x * static_cast<int64_t>(buckets) + key] + rank] = i;
}

}  // namespace

template <typename scalar_t>
void gather_rows(const scalar_t* src, const int64_t* idx, scalar_t* out, int64_t n, int64_t d, cudaStream_t s) {
  if (n > 0) gather_rows_kernel<scalar_t><<<static_cast<unsigned>(n), 128, 0, s>>>(src, idx, out, n, d);
}
template <typename scalar_t>
void combine_rows(const scalar_t* src, const int64_t* row_of_slot, const scalar_t* w_slots, scalar_t* out,
                  int64_t tokens, int64_t d, int k, cudaStream_t s) {
  if (tokens > 0)
    combine_rows_kernel<scalar_t><<<static_cast<unsigned>(tokens), 128, 0, s>>>(src, row_of_slot, w_slots, out, tokens, d, k);
}
template <typename scalar_t>
void scale_rows_dot(const scalar_t* g, const scalar_t* y, const int64_t* token_of_row, const scalar_t* w_row,
                    scalar_t* dy, float* dw, int64_t rows, int64_t d, cudaStream_t s) {
  if (rows > 0)
    scale_rows_dot_kernel<scalar_t><<<static_cast<unsigned>(rows), 256, 0, s>>>(g, y, token_of_row, w_row, dy, dw, rows, d);
}

void softmax_topk(const float* logits, float* probs, int64_t* top, float* gates, int64_t tokens, int experts,
                  int k, cudaStream_t s) {
  if (tokens > 0) softmax_topk_kernel<<<blocks_for(tokens, 128), 128, 0, s>>>(logits, probs, top, gates, tokens, experts, k);
}
void block_histogram(const int64_t* keys, int64_t* hist, int64_t n, int buckets, cudaStream_t s) {
  if (n > 0)
    block_histogram_kernel<<<blocks_for(n, kSortBlock), kSortBlock, buckets * sizeof(int), s>>>(keys, hist, n, buckets);
}
void block_scatter(const int64_t* keys, const int64_t* base, int64_t* dest, int64_t n, int buckets, cudaStream_t s) {
  if (n > 0) block_scatter_kernel<<<blocks_for(n, kSortBlock), kSortBlock, 0, s>>>(keys, base, dest, n, buckets);
}

#define RAPID_INSTANTIATE(T)                                                                              \
  template void gather_rows<T>(const T*, const int64_t*, T*, int64_t, int64_t, cudaStream_t);             \
  template void combine_rows<T>(const T*, const int64_t*, const T*, T*, int64_t, int64_t, int, cudaStream_t); \
  template void scale_rows_dot<T>(const T*, const T*, const int64_t*, const T*, T*, float*, int64_t, int64_t, \
                                  cudaStream_t);
RAPID_INSTANTIATE(float)
RAPID_INSTANTIATE(__half)
RAPID_INSTANTIATE(__nv_bfloat16)

}  // namespace rapid_moe

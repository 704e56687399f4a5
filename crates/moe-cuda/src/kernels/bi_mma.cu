// The tensor-core batch-invariant GEMM (bf16 storage only), compiled for `compute_80` and up
// in a module of its own by `kernels::Kernels::compile`, and only for runners in
// batch-invariant mode, so the other kernels' compilation is never touched. Launched only
// through its typed launcher in `kernels/launch.rs`.
//
// `bi_mma`: `out[m, n] = sum_k x[m, k] * w[n, k]` (+ `beta * out`) with `mma.sync` m16n8k16
// (bf16 inputs, f32 accumulation). A block of 4 warps owns 32 rows x 16 columns; k runs in
// 32-element chunks, chunk c on warp c mod 4, each chunk two mma steps (the lane with
// `t = lane % 4` feeds k = 32c + 8t + 0..3 to the first and 8t + 4..7 to the second, on both
// operands, so every product is summed exactly once); the warps' partial sums are added in
// warp order. Every output element's arithmetic is thus fixed by K alone: which rows share
// its tile, M, the grid and the load width never change it, and a row's position inside the
// 16-row fragment does not either (an mma computes each output element from its own row and
// column only). Two modes: plain (`counts` null; batch `blockIdx.z` at strides sx, sw, so),
// and routed experts (as `moe_gemv`: expert `blockIdx.z` has `counts[e]` rows from
// `offsets[e]`, read through `row_idx` when not null, weights at `wptrs[e] + w_off`, output
// rows `offsets[e] + j`; blocks past an expert's rows return at once).
typedef unsigned short bf16;
__device__ __forceinline__ float b2f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ bf16 f2b(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}
#define MT 2
#define NT 2
#define KW 4
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2,
    unsigned a3, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Elements k..k+7 of row p (zeros past K, or everywhere for a null row), packed two per word
// (lower index in the lower half).
__device__ __forceinline__ uint4 ld8(const bf16* p, int k, int K, int aligned) {
  uint4 r;
  if (p == 0 || k >= K) { r.x = 0u; r.y = 0u; r.z = 0u; r.w = 0u; return r; }
  if (aligned) return *(const uint4*)(p + k);
  unsigned h[8];
#pragma unroll
  for (int v = 0; v < 8; v++) h[v] = (k + v < K) ? (unsigned)p[k + v] : 0u;
  r.x = h[0] | (h[1] << 16); r.y = h[2] | (h[3] << 16);
  r.z = h[4] | (h[5] << 16); r.w = h[6] | (h[7] << 16);
  return r;
}
extern "C" __global__ void bi_mma(const bf16* x, int ldx, long long sx, const bf16* w, int ldw,
    long long sw, void* out, int ldo, long long so, int out_bf16, float beta, int M, int N,
    int K, int aligned, const int* counts, const int* offsets, const int* row_idx,
    const unsigned long long* wptrs, long long w_off) {
  __shared__ float red[KW - 1][MT * NT * 4][32];
  int b = blockIdx.z;
  int base = 0, rows = M;
  int m0 = blockIdx.y * 16 * MT, n0 = blockIdx.x * 8 * NT;
  if (counts) {
    rows = counts[b];
    if (m0 >= rows) return;
    base = offsets[b];
    w = (const bf16*)wptrs[b] + w_off;
  } else {
    x += (size_t)b * sx;
    w += (size_t)b * sw;
  }
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bf16* xr[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      int r = m0 + mt * 16 + hf * 8 + g;
      int src = counts ? (row_idx ? row_idx[base + r < base + rows ? base + r : base] : base + r)
                       : r;
      xr[mt][hf] = r < rows ? x + (size_t)src * ldx : (const bf16*)0;
    }
  const bf16* wr[NT];
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    int n = n0 + nt * 8 + g;
    wr[nt] = n < N ? w + (size_t)n * ldw : (const bf16*)0;
  }
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[mt][nt][i] = 0.f;
  int chunks = (K + 31) / 32;
#pragma unroll 2
  for (int c = warp; c < chunks; c += KW) {
    int k = c * 32 + t * 8;
    uint4 a[MT][2], bw[NT];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
      a[mt][0] = ld8(xr[mt][0], k, K, aligned);
      a[mt][1] = ld8(xr[mt][1], k, K, aligned);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) bw[nt] = ld8(wr[nt], k, K, aligned);
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        mma16816(acc[mt][nt], a[mt][0].x, a[mt][1].x, a[mt][0].y, a[mt][1].y, bw[nt].x,
                 bw[nt].y);
        mma16816(acc[mt][nt], a[mt][0].z, a[mt][1].z, a[mt][0].w, a[mt][1].w, bw[nt].z,
                 bw[nt].w);
      }
  }
  if (warp > 0) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) red[warp - 1][(mt * NT + nt) * 4 + i][lane] = acc[mt][nt][i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
          float v = acc[mt][nt][i];
#pragma unroll
          for (int q = 0; q < KW - 1; q++) v += red[q][(mt * NT + nt) * 4 + i][lane];
          int row = m0 + mt * 16 + g + (i >= 2 ? 8 : 0);
          int col = n0 + nt * 8 + t * 2 + (i & 1);
          if (row < rows && col < N) {
            size_t idx = counts ? (size_t)(base + row) * ldo + col
                                : (size_t)b * so + (size_t)row * ldo + col;
            if (out_bf16) {
              bf16* o = (bf16*)out;
              if (beta != 0.f) v = v + beta * b2f(o[idx]);
              o[idx] = f2b(v);
            } else {
              float* o = (float*)out;
              if (beta != 0.f) v = v + beta * o[idx];
              o[idx] = v;
            }
          }
        }
  }
}

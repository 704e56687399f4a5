// The NVRTC kernels of the CUDA runner (every kernel but `bi_mma`), compiled once per device by
// `kernels::Kernels::compile` and launched only through the typed launchers in
// `kernels/launch.rs` (one per `extern "C" __global__` function below; a host test checks that
// each launcher's parameter list matches the signature here).
//
// bf16 is handled as raw `unsigned short` bits (no CUDA headers, so NVRTC needs no include path):
// weights and GEMM inputs are bf16, everything else (residual stream, attention, router, KV cache)
// is `f32`. Reductions run in `f32`. Compiled with `ACT_F32` defined (the runner's
// `Precision::F32`), the same source stores weights and GEMM inputs as `float` instead.
#define INFINITY __int_as_float(0x7f800000)
#ifdef ACT_F32
// Reference precision: weights and GEMM-input activations are f32 (weights hold bf16 values).
typedef float bf16;
__device__ __forceinline__ float b2f(float x) { return x; }
__device__ __forceinline__ float f2b(float f) { return f; }
#else
typedef unsigned short bf16;
__device__ __forceinline__ float b2f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ bf16 f2b(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}
#endif
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  if (w == 0) {
    v = (l < nw) ? red[l] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (l == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}
__device__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  if (w == 0) {
    v = (l < nw) ? red[l] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (l == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

extern "C" __global__ void embed(const int* tok, const bf16* table, float* out, int hidden) {
  int r = blockIdx.x;
  const bf16* src = table + (size_t)tok[r] * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[(size_t)r * hidden + i] = b2f(src[i]);
}

// RMS norm of segment blockIdx.x of row blockIdx.y; either output may be null. In place is fine.
extern "C" __global__ void rms_norm(const float* x, int x_row, int seg_stride, const bf16* w,
    int width, float eps, float* out_f, int of_row, bf16* out_b, int ob_row) {
  __shared__ float red[32];
  int r = blockIdx.y, s = blockIdx.x;
  const float* xr = x + (size_t)r * x_row + (size_t)s * seg_stride;
  float acc = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) acc += xr[i] * xr[i];
  float ss = block_sum(acc, red);
  float inv = 1.f / sqrtf(ss / (float)width + eps);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = b2f(w[i]) * (xr[i] * inv);
    if (out_f) out_f[(size_t)r * of_row + (size_t)s * seg_stride + i] = v;
    if (out_b) out_b[(size_t)r * ob_row + (size_t)s * seg_stride + i] = f2b(v);
  }
}

extern "C" __global__ void rope(float* x, int row_stride, int heads, int head_stride, int offset,
    int dim, const int* pos, const float* cos_t, const float* sin_t, int interleaved) {
  int r = blockIdx.x, half = dim / 2;
  const float* c = cos_t + (size_t)pos[r] * half;
  const float* sn = sin_t + (size_t)pos[r] * half;
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    int h = idx / half, i = idx % half;
    float* b = x + (size_t)r * row_stride + (size_t)h * head_stride + offset;
    int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    float a = b[ia], bb = b[ib];
    b[ia] = a * c[i] - bb * sn[i];
    b[ib] = bb * c[i] + a * sn[i];
  }
}

__device__ __forceinline__ float* kv_token(float* kv, int block_floats, int bt, int layer,
    int token_floats, const int* table, int p) {
  int blk = table[p / bt];
  return kv + (size_t)blk * block_floats + ((size_t)layer * bt + (p % bt)) * token_floats;
}

extern "C" __global__ void kv_write(float* kv, int block_floats, int bt, int layer,
    int token_floats, const int* tables, const int* tbl_off, const int* pos, const float* a,
    int a_stride, int wa, const float* b, int b_stride, int wb) {
  int r = blockIdx.x;
  float* dst = kv_token(kv, block_floats, bt, layer, token_floats, tables + tbl_off[r], pos[r]);
  for (int i = threadIdx.x; i < wa; i += blockDim.x) dst[i] = a[(size_t)r * a_stride + i];
  for (int i = threadIdx.x; i < wb; i += blockDim.x) dst[wa + i] = b[(size_t)r * b_stride + i];
}

// Causal GQA over paged f32 KV. grid (heads, rows); shared: q[hd] then scores[ctx].
extern "C" __global__ void attn_gqa(const float* q, int q_row, float* kv, int block_floats,
    int bt, int layer, int token_floats, const int* tables, const int* tbl_off, const int* pos,
    int heads, int kv_heads, int hd, float scale, bf16* out, int out_row) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  int h = blockIdx.x, r = blockIdx.y;
  int kvh = h / (heads / kv_heads);
  const int* table = tables + tbl_off[r];
  int ctx = pos[r] + 1;
  float* qs = sm;
  float* sc = sm + hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = q[(size_t)r * q_row + h * hd + d];
  __syncthreads();
  float mx = -INFINITY;
  for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
    const float* k = kv_token(kv, block_floats, bt, layer, token_floats, table, t) + kvh * hd;
    float s = 0.f;
    for (int d = 0; d < hd; d++) s += qs[d] * k[d];
    s *= scale;
    sc[t] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
    float e = expf(sc[t] - mx);
    sc[t] = e;
    sum += e;
  }
  sum = block_sum(sum, red);
  float inv = 1.f / sum;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.f;
    for (int t = 0; t < ctx; t++) {
      const float* v = kv_token(kv, block_floats, bt, layer, token_floats, table, t)
          + kv_heads * hd + kvh * hd;
      acc += (sc[t] * inv) * v[d];
    }
    out[(size_t)r * out_row + h * hd + d] = f2b(acc);
  }
}

// MLA in latent space (absorbed). grid (heads, rows); shared: qlat[r], qpe[rope], scores[ctx].
extern "C" __global__ void attn_mla(const float* qlat, const float* q, int q_row, int qhd,
    int nope, int rope_dim, int lr, float* kv, int block_floats, int bt, int layer,
    int token_floats, const int* tables, const int* tbl_off, const int* pos, int heads,
    float scale, bf16* olat) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  int h = blockIdx.x, r = blockIdx.y;
  const int* table = tables + tbl_off[r];
  int ctx = pos[r] + 1;
  float* ql = sm;
  float* qp = sm + lr;
  float* sc = qp + rope_dim;
  for (int d = threadIdx.x; d < lr; d += blockDim.x) ql[d] = qlat[((size_t)r * heads + h) * lr + d];
  for (int d = threadIdx.x; d < rope_dim; d += blockDim.x)
    qp[d] = q[(size_t)r * q_row + h * qhd + nope + d];
  __syncthreads();
  float mx = -INFINITY;
  for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
    const float* c = kv_token(kv, block_floats, bt, layer, token_floats, table, t);
    float s1 = 0.f, s2 = 0.f;
    for (int d = 0; d < lr; d++) s1 += ql[d] * c[d];
    for (int d = 0; d < rope_dim; d++) s2 += qp[d] * c[lr + d];
    float s = (s1 + s2) * scale;
    sc[t] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
    float e = expf(sc[t] - mx);
    sc[t] = e;
    sum += e;
  }
  sum = block_sum(sum, red);
  float inv = 1.f / sum;
  for (int d = threadIdx.x; d < lr; d += blockDim.x) {
    float acc = 0.f;
    for (int t = 0; t < ctx; t++)
      acc += (sc[t] * inv) * kv_token(kv, block_floats, bt, layer, token_floats, table, t)[d];
    olat[((size_t)r * heads + h) * lr + d] = f2b(acc);
  }
}

// out[r, o] = dot(x[r, :], w[o, :]) with f32 activations and bf16 weights. grid (out, rows).
extern "C" __global__ void linear_f32(const float* x, const bf16* w, float* out, int in, int outf) {
  __shared__ float red[32];
  int o = blockIdx.x, r = blockIdx.y;
  const float* xr = x + (size_t)r * in;
  const bf16* wr = w + (size_t)o * in;
  float acc = 0.f;
  for (int i = threadIdx.x; i < in; i += blockDim.x) acc += xr[i] * b2f(wr[i]);
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) out[(size_t)r * outf + o] = acc;
}

// Softmax router with optional group limit; one warp per row (grid rows, block 32), the same
// results as a sequential scan of the row: the softmax sum and the group scores run in ascending
// expert order, each group pick is the first largest score, and each of the k expert picks is
// the lowest allowed id among the largest probabilities, or the first allowed id when its
// probability is NaN (NaN never replaces a pick). Choices ascending by expert id; id -1 and
// weight 0 if fewer than k experts are allowed (the host validates the spec, so it does not
// happen).
extern "C" __global__ void route(const float* logits, int rows, int E, int k, int n_group,
    int topk_group, int normalize, float scale, int* ids, float* wts) {
  __shared__ float p[256];
  __shared__ int allowed[256];
  __shared__ float gs[64];
  __shared__ int keep[64];
  __shared__ int chosen[32];
  __shared__ float tot_sum;
  int r = blockIdx.x, lane = threadIdx.x;
  if (r >= rows) return;
  const float* lr = logits + (size_t)r * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = fmaxf(mx, lr[e]);
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  for (int e = lane; e < E; e += 32) p[e] = expf(lr[e] - mx);
  __syncthreads();
  if (lane == 0) {
    float sum = 0.f;
    for (int e = 0; e < E; e++) sum += p[e];
    tot_sum = sum;
  }
  __syncthreads();
  float sum = tot_sum;
  for (int e = lane; e < E; e += 32) { p[e] /= sum; allowed[e] = 1; }
  __syncthreads();
  if (n_group > 0) {
    int per = E / n_group;
    for (int g = lane; g < n_group; g += 32) {
      float m = -INFINITY;
      for (int e = g * per; e < (g + 1) * per; e++) m = fmaxf(m, p[e]);
      gs[g] = m;
      keep[g] = 0;
    }
    __syncthreads();
    if (lane == 0) {
      for (int j = 0; j < topk_group; j++) {
        int best = -1;
        for (int g = 0; g < n_group; g++)
          if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
        if (best >= 0) keep[best] = 1;
      }
    }
    __syncthreads();
    for (int e = lane; e < E; e += 32) allowed[e] = keep[e / per];
    __syncthreads();
  }
  for (int j = 0; j < k; j++) {
    int first = E;
    for (int e = lane; e < E; e += 32)
      if (allowed[e]) { first = e; break; }
    for (int o = 16; o > 0; o >>= 1) first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
    int best;
    if (first >= E) {
      best = -1;
    } else if (p[first] != p[first]) {
      best = first;
    } else {
      float bv = 0.f;
      int bi = -1;
      for (int e = lane; e < E; e += 32)
        if (allowed[e] && p[e] == p[e] && (bi < 0 || p[e] > bv)) { bv = p[e]; bi = e; }
      for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; }
      }
      best = __shfl_sync(0xffffffffu, bi, 0);
    }
    if (lane == 0) {
      chosen[j] = best;
      if (best >= 0) allowed[best] = 0;
    }
    __syncthreads();
  }
  if (lane != 0) return;
  float w[32];
  float tot = 0.f;
  for (int j = 0; j < k; j++) { w[j] = chosen[j] >= 0 ? p[chosen[j]] : 0.f; tot += w[j]; }
  for (int j = 0; j < k; j++) w[j] = normalize ? w[j] / tot : w[j] * scale;
  int c[32];
  for (int j = 0; j < k; j++) c[j] = chosen[j];
  for (int a = 1; a < k; a++) {
    int ci = c[a]; float wi = w[a]; int b = a - 1;
    while (b >= 0 && c[b] > ci) { c[b + 1] = c[b]; w[b + 1] = w[b]; b--; }
    c[b + 1] = ci; w[b + 1] = wi;
  }
  for (int j = 0; j < k; j++) { ids[r * k + j] = c[j]; wts[r * k + j] = w[j]; }
}

// dst[g] = src[idx[g]] (zero row when idx[g] < 0). grid rows.
extern "C" __global__ void gather_bf16(const bf16* src, int width, const int* idx, bf16* dst) {
  int g = blockIdx.x, s = idx[g];
  for (int i = threadIdx.x; i < width; i += blockDim.x)
    dst[(size_t)g * width + i] = s < 0 ? (bf16)0 : src[(size_t)s * width + i];
}

extern "C" __global__ void silu_mul(const float* g, int g_row, const float* u, int u_row,
    bf16* out, int inter) {
  int r = blockIdx.x;
  for (int i = threadIdx.x; i < inter; i += blockDim.x) {
    float a = g[(size_t)r * g_row + i];
    out[(size_t)r * inter + i] = f2b(a / (1.f + expf(-a)) * u[(size_t)r * u_row + i]);
  }
}

// hidden[t] += sum_s w[t,s] * eout[idx[t,s]] (ascending expert id) + shared[t].
extern "C" __global__ void combine(float* hidden, int H, int k, const int* idx, const float* wts,
    const float* eout, const float* shared, int shared_row) {
  int t = blockIdx.x;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < k; s++) acc += eout[(size_t)idx[t * k + s] * H + i] * wts[t * k + s];
    if (shared) acc += shared[(size_t)t * shared_row + i];
    hidden[(size_t)t * H + i] += acc;
  }
}

// Expert parallel, the way back: for each slot s of the step's global rows (grid: slots) whose
// expert this GPU owns (owner[ids[s]] == me), copies the expert's output row eo[cidx[s]] (H
// floats) into the return buffer of the rank that holds the row: rets[r] + (s - offs[r] * k) * H,
// r the rank with offs[r] <= s / k < offs[r + 1] (R ranks). Remote rows are written over NVLink.
extern "C" __global__ void ep_return(const int* ids, int E, const int* owner, int me,
    const int* cidx, const float* eo, int H, int k, const int* offs, int R,
    const unsigned long long* rets) {
  int s = blockIdx.x, e = ids[s];
  if (e < 0 || e >= E || owner[e] != me) return;
  int row = s / k, r = 0;
  while (r + 1 < R && offs[r + 1] <= row) r++;
  float* dst = (float*)rets[r] + (size_t)(s - offs[r] * k) * H;
  const float* src = eo + (size_t)cidx[s] * H;
  if ((H & 3) == 0) {
    const float4* s4 = (const float4*)src;
    float4* d4 = (float4*)dst;
    for (int i = threadIdx.x; i < H / 4; i += blockDim.x) d4[i] = s4[i];
  } else {
    for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
  }
}

// Device-side dispatch, one block of at least E threads: counts[e] slots route to expert e,
// offsets[e] is their exclusive prefix sum (ascending expert id), gidx[offsets[e] + j] is the
// token row of the j-th such slot (ascending slot order) and cidx[slot] its compact row.
// active[0] = number of experts with at least one slot (for the bytes-read accounting).
// Expert parallel: with `owner` non-null only the experts with owner[e] == me count (the others
// get no rows, and their slots' cidx is left as it was).
extern "C" __global__ void moe_dispatch(const int* ids, int slots, int E, int k, int* counts,
    int* offsets, int* gidx, int* cidx, int* active, const int* owner, int me) {
  __shared__ int cnt[256];
  __shared__ int off[256];
  int e = threadIdx.x;
  if (e < E) {
    int c = 0;
    if (!owner || owner[e] == me)
      for (int s = 0; s < slots; s++) c += ids[s] == e;
    cnt[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0, act = 0;
    for (int x = 0; x < E; x++) { off[x] = acc; acc += cnt[x]; act += cnt[x] > 0; }
    active[0] = act;
  }
  __syncthreads();
  if (e < E) {
    counts[e] = cnt[e];
    offsets[e] = off[e];
    if (cnt[e] > 0) {
      int j = off[e];
      for (int s = 0; s < slots; s++)
        if (ids[s] == e) { gidx[j] = s / k; cidx[s] = j; j++; }
    }
  }
}

// Padded dispatch for batched GEMMs over every expert, one block of at least E threads: the
// j-th slot (ascending slot order) routed to expert e goes to padded row e * cap + j while
// j < cap (gidx[e * cap + j] = its token row; unused padded rows get -1), and past that to
// the overflow rows: ov_counts[e] = max(0, count - cap), ov_offsets[e] their exclusive
// prefix sum, ov_gidx[ov_offsets[e] + j - cap] its token row, and the slot's compact row is
// E * cap + ov_offsets[e] + j - cap. cidx[slot] = the slot's row. active[0] as in moe_dispatch.
extern "C" __global__ void moe_dispatch_padded(const int* ids, int slots, int E, int k, int cap,
    int* gidx, int* cidx, int* ov_counts, int* ov_offsets, int* ov_gidx, int* active) {
  __shared__ int cnt[256];
  __shared__ int off[256];
  int e = threadIdx.x;
  if (e < E) {
    int c = 0;
    for (int s = 0; s < slots; s++) c += ids[s] == e;
    cnt[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0, act = 0;
    for (int x = 0; x < E; x++) {
      off[x] = acc;
      acc += cnt[x] > cap ? cnt[x] - cap : 0;
      act += cnt[x] > 0;
    }
    active[0] = act;
  }
  __syncthreads();
  if (e < E) {
    int over = cnt[e] > cap ? cnt[e] - cap : 0;
    ov_counts[e] = over;
    ov_offsets[e] = off[e];
    int j = 0;
    for (int s = 0; s < slots; s++) {
      if (ids[s] != e) continue;
      if (j < cap) {
        gidx[e * cap + j] = s / k;
        cidx[s] = e * cap + j;
      } else {
        int o = off[e] + j - cap;
        ov_gidx[o] = s / k;
        cidx[s] = E * cap + o;
      }
      j++;
    }
    for (; j < cap; j++) gidx[e * cap + j] = -1;
  }
}

// Grouped dispatch for the tensor-core batched GEMMs over the active experts only, one block
// of at least E threads (E <= 256). With n = the busiest expert's slot count and the active
// experts (at least one slot) numbered a = 0, 1, ... in ascending id, the j-th slot (ascending
// slot order) routed to expert e goes to row a * n + j: gidx[a * n + j] = its token row (-1 for
// the rows past the expert's count, up to n), cidx[slot] = a * n + j. ptrs gets six arrays of
// `act` addresses each (act = number of active experts): expert base (etable[e]), xg + a*n rows,
// gu + a*n rows, expert base + down_off, eh + a*n rows, eo + a*n rows (row strides in bytes).
// info = {act, n, bad}: bad = 1 if some id lies outside 0..E (nothing else written); when
// act * n > cap nothing but info is written. active[0] = act. Expert parallel: with `owner`
// non-null only the experts with owner[e] == me count, as in moe_dispatch.
extern "C" __global__ void moe_dispatch_grouped(const int* ids, int slots, int E, int k, int cap,
    const unsigned long long* etable, long long down_off, unsigned long long xg, long long xg_row,
    unsigned long long gu, long long gu_row, unsigned long long eh, long long eh_row,
    unsigned long long eo, long long eo_row, int* gidx, int* cidx, unsigned long long* ptrs,
    int* info, int* active, const int* owner, int me) {
  __shared__ int cnt[256];
  __shared__ int aidx[256];
  __shared__ int bad, act_s, max_s;
  int e = threadIdx.x;
  if (e == 0) bad = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < slots; s += blockDim.x)
    if (ids[s] < 0 || ids[s] >= E) bad = 1;
  if (e < E) {
    int c = 0;
    if (!owner || owner[e] == me)
      for (int s = 0; s < slots; s++) c += ids[s] == e;
    cnt[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int act = 0, mx = 0;
    for (int x = 0; x < E; x++) {
      aidx[x] = act;
      act += cnt[x] > 0;
      mx = cnt[x] > mx ? cnt[x] : mx;
    }
    act_s = act;
    max_s = mx;
    info[0] = act;
    info[1] = mx;
    info[2] = bad;
    active[0] = act;
  }
  __syncthreads();
  int act = act_s, n = max_s;
  if (bad || (long long)act * n > cap) return;
  if (e < E && cnt[e] > 0) {
    int a = aidx[e];
    int row0 = a * n;
    int j = 0;
    for (int s = 0; s < slots; s++)
      if (ids[s] == e) { gidx[row0 + j] = s / k; cidx[s] = row0 + j; j++; }
    for (; j < n; j++) gidx[row0 + j] = -1;
    unsigned long long base = etable[e];
    ptrs[a] = base;
    ptrs[act + a] = xg + (unsigned long long)row0 * xg_row;
    ptrs[2 * act + a] = gu + (unsigned long long)row0 * gu_row;
    ptrs[3 * act + a] = base + down_off;
    ptrs[4 * act + a] = eh + (unsigned long long)row0 * eh_row;
    ptrs[5 * act + a] = eo + (unsigned long long)row0 * eo_row;
  }
}

#define MOE_ROWS 8
#define MOE_WARPS 8
#define MOE_COLS 4
#ifdef ACT_F32
#define VEC 4
__device__ __forceinline__ void unpack(uint4 u, float* f) {
  f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
#else
#define VEC 8
__device__ __forceinline__ void unpack(uint4 u, float* f) {
  f[0] = __uint_as_float(u.x << 16); f[1] = __uint_as_float(u.x & 0xffff0000u);
  f[2] = __uint_as_float(u.y << 16); f[3] = __uint_as_float(u.y & 0xffff0000u);
  f[4] = __uint_as_float(u.z << 16); f[5] = __uint_as_float(u.z & 0xffff0000u);
  f[6] = __uint_as_float(u.w << 16); f[7] = __uint_as_float(u.w & 0xffff0000u);
}
#endif

// Routed-expert products without the host knowing the routes: for each expert e (grid.y) with
// counts[e] > 0, out[offsets[e] + j, col] = dot(x[row_j], W_e[col]) for its rows j, where
// W_e = wptrs[e] + w_off ([N, K] row-major) and row_j = row_idx[offsets[e] + j] (or
// offsets[e] + j when row_idx is null). Experts with no rows return at once, so their weights
// are never read. Each warp owns MOE_COLS columns; rows go through shared memory `rchunk` at a
// time (at most MOE_ROWS). K must be a multiple of VEC. The dot product's order depends only on
// K, never on the other rows.
extern "C" __global__ void moe_gemv(const int* counts, const int* offsets, const int* row_idx,
    const bf16* x, int ldx, const unsigned long long* wptrs, long long w_off, int N, int K,
    float* out, int ldo, int rchunk) {
  extern __shared__ uint4 xs4[];
  int e = blockIdx.y;
  int cnt = counts[e];
  if (cnt == 0) return;
  int base = offsets[e];
  const bf16* W = (const bf16*)wptrs[e] + w_off;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int col0 = (blockIdx.x * MOE_WARPS + warp) * MOE_COLS;
  int kv = K / VEC;
  for (int r0 = 0; r0 < cnt; r0 += rchunk) {
    int nr = min(rchunk, cnt - r0);
    __syncthreads();
    for (int idx = threadIdx.x; idx < nr * kv; idx += blockDim.x) {
      int j = idx / kv, c = idx - j * kv;
      int src = row_idx ? row_idx[base + r0 + j] : base + r0 + j;
      xs4[j * kv + c] = ((const uint4*)(x + (size_t)src * ldx))[c];
    }
    __syncthreads();
    for (int cc = 0; cc < MOE_COLS; cc++) {
      int col = col0 + cc;
      if (col >= N) break;
      const uint4* wr = (const uint4*)(W + (size_t)col * K);
      float acc[MOE_ROWS];
#pragma unroll
      for (int j = 0; j < MOE_ROWS; j++) acc[j] = 0.f;
#pragma unroll 4
      for (int c = lane; c < kv; c += 32) {
        float wf[VEC];
        unpack(wr[c], wf);
#pragma unroll
        for (int j = 0; j < MOE_ROWS; j++) {
          if (j < nr) {
            float xf[VEC];
            unpack(xs4[j * kv + c], xf);
#pragma unroll
            for (int v = 0; v < VEC; v++) acc[j] += wf[v] * xf[v];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < MOE_ROWS; j++) {
        float a = acc[j];
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0 && j < nr) out[(size_t)(base + r0 + j) * ldo + col] = a;
      }
    }
  }
}

// Batch-invariant GEMM on CUDA cores (`batch_invariant` mode in the f32 reference precision;
// bf16 uses `bi_mma`, MMA_SOURCE): for each batch b (grid.z),
// out[m, n] (ldo, +b*so) = sum_k x[m, k] (ldx, +b*sx) * w[n, k] (ldw, +b*sw), plus beta * out
// when beta != 0; out is bf16 when out_bf16, else f32. grid (ceil(N / (BI_WARPS*BI_COLS)),
// ceil(M / BI_ROWS), batch), block 32*BI_WARPS.
// The reduction order of one output element is fixed by K alone: lane l of the warp that owns
// column n adds, for k's VEC-element groups c = l, l+32, l+64, ... in ascending order, the VEC
// products of group c in ascending order (fmaf), and the 32 lane sums are then combined by a
// fixed xor butterfly. Which rows share the block, how many rows the step has, the tiling of k
// through shared memory (BI_KTV groups per tile, a multiple of 32) and whether the loads are
// 128-bit (`aligned`) or scalar with zero padding past K never change that order, so a row's
// result is bitwise the same in any batch. No split-K, no atomics.
#define BI_ROWS 16
#define BI_WARPS 8
#define BI_COLS 4
#define BI_KTV 128
__device__ __forceinline__ void bi_store(void* out, size_t idx, float v, int out_bf16,
    float beta) {
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
__device__ __forceinline__ void bi_load_vec(const bf16* p, int k, int K, int aligned,
    float* f) {
  if (aligned) {
    unpack(*(const uint4*)p, f);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; v++) f[v] = (k + v < K) ? b2f(p[v]) : 0.f;
  }
}
extern "C" __global__ void bi_gemm(const bf16* x, int ldx, long long sx, const bf16* w,
    int ldw, long long sw, void* out, int ldo, long long so, int out_bf16, float beta, int M,
    int N, int K, int aligned) {
  __shared__ uint4 xs[BI_ROWS * BI_KTV];
  int b = blockIdx.z;
  x += (size_t)b * sx;
  w += (size_t)b * sw;
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int col0 = (blockIdx.x * BI_WARPS + warp) * BI_COLS;
  int row0 = blockIdx.y * BI_ROWS;
  int nr = min(BI_ROWS, M - row0);
  int kv = (K + VEC - 1) / VEC;
  float acc[BI_COLS][BI_ROWS];
#pragma unroll
  for (int cc = 0; cc < BI_COLS; cc++)
#pragma unroll
    for (int j = 0; j < BI_ROWS; j++) acc[cc][j] = 0.f;
  for (int t0 = 0; t0 < kv; t0 += BI_KTV) {
    int tv = min(BI_KTV, kv - t0);
    __syncthreads();
    for (int idx = threadIdx.x; idx < nr * tv; idx += blockDim.x) {
      int j = idx / tv, c = idx - j * tv;
      int k = (t0 + c) * VEC;
      const bf16* src = x + (size_t)(row0 + j) * ldx + k;
      if (aligned) {
        xs[j * BI_KTV + c] = *(const uint4*)src;
      } else {
        bf16* d = (bf16*)&xs[j * BI_KTV + c];
#pragma unroll
        for (int v = 0; v < VEC; v++) d[v] = (k + v < K) ? src[v] : (bf16)0;
      }
    }
    __syncthreads();
    for (int c = lane; c < tv; c += 32) {
      int k = (t0 + c) * VEC;
      float wf[BI_COLS][VEC];
#pragma unroll
      for (int cc = 0; cc < BI_COLS; cc++) {
        int col = col0 + cc;
        if (col < N) {
          bi_load_vec(w + (size_t)col * ldw + k, k, K, aligned, wf[cc]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; v++) wf[cc][v] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < BI_ROWS; j++) {
        if (j < nr) {
          float xf[VEC];
          unpack(xs[j * BI_KTV + c], xf);
#pragma unroll
          for (int cc = 0; cc < BI_COLS; cc++)
#pragma unroll
            for (int v = 0; v < VEC; v++) acc[cc][j] = fmaf(wf[cc][v], xf[v], acc[cc][j]);
        }
      }
    }
  }
#pragma unroll
  for (int cc = 0; cc < BI_COLS; cc++) {
#pragma unroll
    for (int j = 0; j < BI_ROWS; j++) {
      float a = acc[cc][j];
      for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      int col = col0 + cc;
      if (lane == 0 && j < nr && col < N)
        bi_store(out, (size_t)b * so + (size_t)(row0 + j) * ldo + col, a, out_bf16, beta);
    }
  }
}

// Batch-invariant GEMM with the weight's k along rows: out[m, n] = sum_k x[m, k] * w[k*ldw + n]
// (batch strides as in bi_gemm; MLA's absorbed q_nope -> latent product). One thread per column
// and row: a single fmaf chain over k = 0..K-1 in order, so again fixed by K alone. grid
// (ceil(N / 128), ceil(M / BI_ROWS), batch), block 128.
#define BI_KN_KT 256
extern "C" __global__ void bi_gemm_kn(const bf16* x, int ldx, long long sx, const bf16* w,
    int ldw, long long sw, void* out, int ldo, long long so, int out_bf16, float beta, int M,
    int N, int K) {
  __shared__ float xs[BI_ROWS * BI_KN_KT];
  int b = blockIdx.z;
  x += (size_t)b * sx;
  w += (size_t)b * sw;
  int n = blockIdx.x * blockDim.x + threadIdx.x;
  int row0 = blockIdx.y * BI_ROWS;
  int nr = min(BI_ROWS, M - row0);
  float acc[BI_ROWS];
#pragma unroll
  for (int j = 0; j < BI_ROWS; j++) acc[j] = 0.f;
  for (int k0 = 0; k0 < K; k0 += BI_KN_KT) {
    int kt = min(BI_KN_KT, K - k0);
    __syncthreads();
    for (int idx = threadIdx.x; idx < nr * kt; idx += blockDim.x) {
      int j = idx / kt, kk = idx - j * kt;
      xs[j * BI_KN_KT + kk] = b2f(x[(size_t)(row0 + j) * ldx + k0 + kk]);
    }
    __syncthreads();
    if (n < N) {
      for (int kk = 0; kk < kt; kk++) {
        float wv = b2f(w[(size_t)(k0 + kk) * ldw + n]);
#pragma unroll
        for (int j = 0; j < BI_ROWS; j++)
          if (j < nr) acc[j] = fmaf(xs[j * BI_KN_KT + kk], wv, acc[j]);
      }
    }
  }
  if (n < N) {
#pragma unroll
    for (int j = 0; j < BI_ROWS; j++)
      if (j < nr)
        bi_store(out, (size_t)b * so + (size_t)(row0 + j) * ldo + n, acc[j], out_bf16, beta);
  }
}

// Greedy choice per row, as the host sampler makes it: the lowest id among the largest finite
// logits; -1 when no logit is finite. grid rows, block 1024.
extern "C" __global__ void argmax_rows(const float* logits, int vocab, int* out) {
  __shared__ float bv[32];
  __shared__ int bi[32];
  const float* l = logits + (size_t)blockIdx.x * vocab;
  float v = 0.f;
  int i = -1;
  for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
    float x = l[t];
    bool fin = (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
    if (fin && (i < 0 || x > v)) { v = x; i = t; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) { v = ov; i = oi; }
  }
  int w = threadIdx.x >> 5, ln = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  if (ln == 0) { bv[w] = v; bi[w] = i; }
  __syncthreads();
  if (w == 0) {
    v = ln < nw ? bv[ln] : 0.f;
    i = ln < nw ? bi[ln] : -1;
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, v, o);
      int oi = __shfl_xor_sync(0xffffffffu, i, o);
      if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) { v = ov; i = oi; }
    }
    if (ln == 0) out[blockIdx.x] = i;
  }
}

extern "C" __global__ void cast_bf16(const float* x, bf16* y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    y[i] = f2b(x[i]);
}

extern "C" __global__ void fill_random(bf16* p, long long n, unsigned long long seed, float scale) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    unsigned long long x = (unsigned long long)i * 0x9E3779B97F4A7C15ull ^ seed;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    float u = (float)(x >> 40) / 16777216.0f;
    p[i] = f2b((2.f * u - 1.f) * scale);
  }
}

extern "C" __global__ void fill_const(bf16* p, long long n, float v) {
  bf16 b = f2b(v);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    p[i] = b;
}

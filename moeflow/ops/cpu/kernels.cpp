// moeflow's CPU kernels for decode-shaped GEMMs: few rows meet each weight, so the time is
// the time to stream the weights once. See moeflow/ops/cpu/__init__.py for the design note.
//
// Shapes: M rows, K input width, N output width; n routed rows, D hidden, F FFN width,
// G experts. Weights are row-major [N, K] (torch's linear layout); every sum is in fp32.
//
// Each op takes `isa` (-1: the best this CPU has; 0: portable C++; 1: AVX2 + FMA; 2: AVX-512
// BF16, whose bf16 GEMMs multiply pairs of bf16 by vdpbf16ps, everything else as on 1) so
// that tests can run every path the machine has.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define MOEFLOW_X86 1
// vdpbf16ps's intrinsics and __builtin_cpu_supports("avx512bf16"): GCC 10, clang 11
#if (defined(__clang__) && __clang_major__ >= 11) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define MOEFLOW_BF16_PAIRS 1
#endif
#endif

namespace moeflow_cpu {
namespace {

using bf16 = c10::BFloat16;

constexpr int NR = 4;  // weight rows per tile: 4 streams, and 4 * K * 2 bytes stay in L1
constexpr int MR = 3;  // input rows per tile: 3 x 4 accumulators + 4 weight registers
constexpr int64_t CHUNK_BYTES = 32 << 10;  // weight bytes per thread, at least
// Software prefetch, bytes ahead of the weights being read. A tile's weight rows are one
// contiguous block (every caller passes ldw == K; another stride would only prefetch in
// vain), read a column step at a time across its
// rows: the prefetch sweeps that block linearly at the rate it is consumed, so the next
// tile's first rows are already on their way when it starts. A prefetch per row, 512 bytes
// ahead in that row, left the start of every row of the next tile to demand misses: with
// short rows (the experts' down projection, K = F = 384 bf16) the kernels streamed at 55-70 %
// of a plain read. Measured on a 2-core EPYC (AVX2): 1 row against the experts of a
// 64-expert, D 1024, F 384 layer, 6.9-7.2 GB/s before, 11-13 GB/s with 8 KiB ahead, the
// 32000 x 1024 LM head 8.6-9.2 before, 14.6-15.3 after (a torch sum reads 9-12 GB/s);
// 4 and 16 KiB ahead were close, 1-2 KiB too short. On the AVX-512 BF16 EPYC, 4 and 16 KiB
// were 1-6 % slower than 8 for the expert FFN at 1 row. Near the end of a run of an expert's
// rows the prefetch runs past it, into weights no one reads next; sending it to the start of
// the thread's next run instead (the next expert's rows) streamed slower, not faster: 0.82x
// on one thread at 1 row (both builds in one process, alternated, in either order), 0.94x on
// two; stopping it at the run's end was as slow.
constexpr int PREFETCH = 8 << 10;

enum Isa : int64_t { PORTABLE = 0, AVX2 = 1, AVX512_BF16 = 2 };

int64_t best_isa() {
#ifdef MOEFLOW_X86
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return PORTABLE;
#ifdef MOEFLOW_BF16_PAIRS
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
    return AVX512_BF16;
#endif
  return AVX2;
#endif
  return PORTABLE;
}

// Whether a GEMM of T multiplies bf16 pairs as they are (vdpbf16ps), its input rows kept in
// bf16, rather than widening both sides to fp32.
template <typename T>
bool pairs_bf16(int64_t isa) {
  return std::is_same<T, bf16>::value && isa >= AVX512_BF16;
}

int64_t resolve(int64_t isa) {
  const int64_t best = best_isa();
  if (isa < 0) return best;
  TORCH_CHECK(isa <= best, "moeflow_cpu: isa ", isa, " is not available on this CPU (best ",
              best, ")");
  return isa;
}

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }

// out[i * NR + j] = sum_k x[i * ldx + k] * w[j * ldw + k], for i < mr, j < nr
template <typename W>
void tile_portable(const float* x, int64_t ldx, int mr, const W* w, int64_t ldw, int nr,
                   int64_t K, float* out) {
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      const float* xi = x + i * ldx;
      const W* wj = w + j * ldw;
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {
        for (int u = 0; u < 4; ++u) s[u] += xi[k + u] * to_float(wj[k + u]);
      }
      float sum = (s[0] + s[1]) + (s[2] + s[3]);
      for (; k < K; ++k) sum += xi[k] * to_float(wj[k]);
      out[i * NR + j] = sum;
    }
  }
}

#ifdef MOEFLOW_X86
#define AVX2_FN __attribute__((target("avx2,fma")))

// One step of 16 inputs. fp32 weights: two loads. bf16 weights: one load of 16, split into
// the even elements (shifted up) and the odd ones (masked): x is laid out to match (see
// `slot`), which halves the widening work against a widening of each 8.
struct Step16 {
  __m256 lo, hi;
};

AVX2_FN inline Step16 load16(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}

AVX2_FN inline Step16 load16(const bf16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))))};
}

// Half h of load16: the same registers, one at a time.
AVX2_FN inline __m256 load8(const float* p, int h) { return _mm256_loadu_ps(p + 8 * h); }

AVX2_FN inline __m256 load8(const bf16* p, int h) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_castsi256_ps(h == 0 ? _mm256_slli_epi32(v, 16)
                                    : _mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
}

AVX2_FN inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-6
// polynomial (relative error about 2e-7 over the range), times 2^n through the exponent
// bits. Inputs are clamped to [-87.3, 88.3], where 2^n stays a normal float; a NaN passes
// through (max and min return their second operand when either is NaN).
AVX2_FN inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// v rounded to bf16 as c10::BFloat16 rounds (to nearest even; a NaN to 0x7FC0), the bf16's
// bits in the low half of each 32-bit lane
AVX2_FN inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(
      _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
      _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// round_to<T> on 8 lanes: v rounded to T and back
template <typename T>
AVX2_FN inline __m256 round8(__m256 v) {
  if constexpr (std::is_same<T, bf16>::value)
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
  else
    return v;
}

// 8 lanes stored as X (v already rounded to X where X is bf16)
AVX2_FN inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

AVX2_FN inline void store8(bf16* p, __m256 v) {
  const __m256i b = bf16_bits8(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

// g / (1 + exp(-g)) on 8 lanes, for g >= -87 (exp8's range; below it, where exp(-g) comes
// near overflow, the caller takes std::exp)
AVX2_FN inline __m256 silu8(__m256 g) {
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f),
                                        exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

// R input rows by C weight rows; one row alone keeps two accumulators per weight row so
// that the FMAs' latency is hidden.
template <int R, int C, typename W>
AVX2_FN void tile_avx2_fixed(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                             float* out) {
  constexpr int S = R == 1 ? 2 : 1;
  __m256 acc[R][C][S];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j)
      for (int s = 0; s < S; ++s) acc[i][j][s] = _mm256_setzero_ps();
  const int64_t body = K / 16 * 16;
  for (int64_t k = 0; k < body; k += 16) {
    {  // the tile is one block (ldw == K): C * 16 elements of it consumed per step
      const char* ahead = reinterpret_cast<const char*>(w + k * C) + PREFETCH;
      for (int b = 0; b < C * 16 * static_cast<int>(sizeof(W)); b += 64)
        _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    if (R == 1) {
      Step16 wv[C];
      for (int j = 0; j < C; ++j) wv[j] = load16(w + j * ldw + k);
      const __m256 lo = _mm256_loadu_ps(x + k);
      const __m256 hi = _mm256_loadu_ps(x + k + 8);
      for (int j = 0; j < C; ++j) {
        acc[0][j][0] = _mm256_fmadd_ps(lo, wv[j].lo, acc[0][j][0]);
        acc[0][j][S - 1] = _mm256_fmadd_ps(hi, wv[j].hi, acc[0][j][S - 1]);
      }
      continue;
    }
    // several rows: one half of the step at a time, so that R x C accumulators and C
    // weight registers fit the 16 registers (both halves at once spilled)
    for (int h = 0; h < 2; ++h) {
      __m256 wv[C];
      for (int j = 0; j < C; ++j) wv[j] = load8(w + j * ldw + k, h);
      for (int i = 0; i < R; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * ldx + k + 8 * h);
        for (int j = 0; j < C; ++j) acc[i][j][0] = _mm256_fmadd_ps(xv, wv[j], acc[i][j][0]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) {
      __m256 a = acc[i][j][0];
      if (S == 2) a = _mm256_add_ps(a, acc[i][j][S - 1]);
      float sum = hsum(a);
      for (int64_t k = body; k < K; ++k) sum += x[i * ldx + k] * to_float(w[j * ldw + k]);
      out[i * NR + j] = sum;
    }
  }
}

template <int R, typename W>
AVX2_FN void tile_avx2_rows(const float* x, int64_t ldx, const W* w, int64_t ldw, int nr,
                            int64_t K, float* out) {
  switch (nr) {
    case 4: return tile_avx2_fixed<R, 4>(x, ldx, w, ldw, K, out);
    case 3: return tile_avx2_fixed<R, 3>(x, ldx, w, ldw, K, out);
    case 2: return tile_avx2_fixed<R, 2>(x, ldx, w, ldw, K, out);
    default: return tile_avx2_fixed<R, 1>(x, ldx, w, ldw, K, out);
  }
}

template <typename W>
AVX2_FN void tile_avx2(const float* x, int64_t ldx, int mr, const W* w, int64_t ldw, int nr,
                       int64_t K, float* out) {
  switch (mr) {
    case 3: return tile_avx2_rows<3>(x, ldx, w, ldw, nr, K, out);
    case 2: return tile_avx2_rows<2>(x, ldx, w, ldw, nr, K, out);
    default: return tile_avx2_rows<1>(x, ldx, w, ldw, nr, K, out);
  }
}
#endif

#ifdef MOEFLOW_BF16_PAIRS
// ---- AVX-512 BF16: pairs of bf16 multiplied as they are --------------------------------
//
// vdpbf16ps adds to each of 16 fp32 lanes the products of a pair of bf16 from each side
// (x[k] w[k] + x[k+1] w[k+1]): no widening, 32 products per instruction. The inputs are
// bf16 already (the model dtype, or a product rounded to it where torch's ops store), so
// nothing is rounded that the other paths keep; inputs and products below the smallest
// normal float count as zero (the instruction's DAZ/FTZ).
#define BF16_FN __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
constexpr int MR_PAIRS = 4;  // input rows per tile: 4 x 4 accumulators of the 32 registers

BF16_FN inline __m512 dot_pairs(__m512 acc, __m512i x, __m512i w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
}

// a[j] holds 16 partial sums of output j -> the 16 outputs' sums, in order: a transposing
// tree, 15 adds and 30 shuffles for all 16 (a horizontal sum each is 16 x 8 instructions)
BF16_FN inline __m512 reduce16(const __m512 (&a)[16]) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [a, b, a, b] of keys 2i, 2i + 1
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per block: keys 4i .. 4i + 3, each its block's sum
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // blocks: keys 8i .. 8i + 3 twice, 8i + 4 .. 8i + 7 twice
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// The tiles' kernel on pairs: R input rows by C weight rows, 32 columns a step (a last
// partial step masked: columns past K read as zero). Its steps prefetch the `span` bytes
// from `ahead` evenly: a tile read by several row groups spreads the next tile's prefetch
// over all of them (see tile), so that memory is kept busy while the later groups read the
// tile from L1. The accumulators are named variables, as panel_micro's: as an array
// acc[R][C], GCC stored all of them to the stack every step, and at 4 x 4 those 16 stores
// were most of the tile's time (32 rows over 8 experts of D = F = 256: 153-160 -> 103-107 us).
template <int R, int C>
BF16_FN void tile_pairs_fixed(const bf16* x, int64_t ldx, const bf16* w, int64_t ldw,
                              int64_t K, float* out, const char* ahead, int64_t span) {
  static_assert(R >= 1 && R <= 4 && C >= 1 && C <= 4, "tiles of up to 4 x 4");
  __m512 a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33;
  a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = _mm512_setzero_ps();
  a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = _mm512_setzero_ps();
#define MOEFLOW_W(j) \
  const __m512i w##j = C > j ? _mm512_maskz_loadu_epi16(mask, w + j * ldw + k) \
                             : _mm512_setzero_si512();
#define MOEFLOW_ROW(i) \
  if (R > i) { \
    const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * ldx + k); \
    a##i##0 = dot_pairs(a##i##0, xv, w0); \
    if (C > 1) a##i##1 = dot_pairs(a##i##1, xv, w1); \
    if (C > 2) a##i##2 = dot_pairs(a##i##2, xv, w2); \
    if (C > 3) a##i##3 = dot_pairs(a##i##3, xv, w3); \
  }
#define MOEFLOW_STEP \
  { MOEFLOW_W(0) MOEFLOW_W(1) MOEFLOW_W(2) MOEFLOW_W(3) \
    MOEFLOW_ROW(0) MOEFLOW_ROW(1) MOEFLOW_ROW(2) MOEFLOW_ROW(3) }
  const int64_t steps = K / 32;
  for (int64_t s = 0; s < steps; ++s) {
    for (const char* a = ahead + span * s / steps; a < ahead + span * (s + 1) / steps; a += 64)
      _mm_prefetch(a, _MM_HINT_T0);
    const int64_t k = s * 32;
    const __mmask32 mask = ~__mmask32(0);
    MOEFLOW_STEP
  }
  const int64_t body = steps * 32;
  if (body < K) {
    const int64_t k = body;
    const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << (K - body)) - 1);
    MOEFLOW_STEP
  }
#define MOEFLOW_SUMS(i) \
  if (R > i) { \
    out[i * NR] = _mm512_reduce_add_ps(a##i##0); \
    if (C > 1) out[i * NR + 1] = _mm512_reduce_add_ps(a##i##1); \
    if (C > 2) out[i * NR + 2] = _mm512_reduce_add_ps(a##i##2); \
    if (C > 3) out[i * NR + 3] = _mm512_reduce_add_ps(a##i##3); \
  }
  if constexpr (R == 4 && C == 4 && NR == 4) {  // out[i * NR + j]: the 16 sums in order
    const __m512 a[16] = {a00, a01, a02, a03, a10, a11, a12, a13,
                          a20, a21, a22, a23, a30, a31, a32, a33};
    _mm512_storeu_ps(out, reduce16(a));
  } else {
    MOEFLOW_SUMS(0) MOEFLOW_SUMS(1) MOEFLOW_SUMS(2) MOEFLOW_SUMS(3)
  }
#undef MOEFLOW_W
#undef MOEFLOW_ROW
#undef MOEFLOW_STEP
#undef MOEFLOW_SUMS
}

template <int R>
BF16_FN void tile_pairs_rows(const bf16* x, int64_t ldx, const bf16* w, int64_t ldw, int nr,
                             int64_t K, float* out, const char* ahead, int64_t span) {
  switch (nr) {
    case 4: return tile_pairs_fixed<R, 4>(x, ldx, w, ldw, K, out, ahead, span);
    case 3: return tile_pairs_fixed<R, 3>(x, ldx, w, ldw, K, out, ahead, span);
    case 2: return tile_pairs_fixed<R, 2>(x, ldx, w, ldw, K, out, ahead, span);
    default: return tile_pairs_fixed<R, 1>(x, ldx, w, ldw, K, out, ahead, span);
  }
}
#endif

// out[M][nr] (row stride NR) = x[M, K] . w[nr, K]^T, MR input rows at a time: the nr
// weight rows come from memory once and from L1 for the other row groups. x in fp32 (in
// Layout order), or in bf16 on the pairs path.
template <typename W>
void tile(int64_t isa, const float* x, int64_t ldx, int64_t M, const W* w, int64_t ldw,
          int nr, int64_t K, float* out) {
  for (int64_t m = 0; m < M; m += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m));
#ifdef MOEFLOW_X86
    if (isa >= AVX2) {
      tile_avx2(x + m * ldx, ldx, mr, w, ldw, nr, K, out + m * NR);
      continue;
    }
#endif
    tile_portable(x + m * ldx, ldx, mr, w, ldw, nr, K, out + m * NR);
  }
}

void tile(int64_t isa, const bf16* x, int64_t ldx, int64_t M, const bf16* w, int64_t ldw,
          int nr, int64_t K, float* out) {
  TORCH_CHECK(isa >= AVX512_BF16, "moeflow_cpu: bf16 inputs need the pairs path");
#ifdef MOEFLOW_BF16_PAIRS
  // the stream PREFETCH bytes ahead of the tile, shared out among its row groups
  const int64_t groups = (M + MR_PAIRS - 1) / MR_PAIRS, bytes = nr * K * 2;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t m = g * MR_PAIRS;
    const bf16* xm = x + m * ldx;
    float* om = out + m * NR;
    const char* ahead = reinterpret_cast<const char*>(w) + PREFETCH + bytes * g / groups;
    const int64_t span = bytes * (g + 1) / groups - bytes * g / groups;
    switch (std::min<int64_t>(MR_PAIRS, M - m)) {
      case 4: tile_pairs_rows<4>(xm, ldx, w, ldw, nr, K, om, ahead, span); break;
      case 3: tile_pairs_rows<3>(xm, ldx, w, ldw, nr, K, om, ahead, span); break;
      case 2: tile_pairs_rows<2>(xm, ldx, w, ldw, nr, K, om, ahead, span); break;
      default: tile_pairs_rows<1>(xm, ldx, w, ldw, nr, K, om, ahead, span); break;
    }
  }
#endif
}

// ---- many rows per weight: packed panels ----------------------------------------------
//
// With many rows the tiles above are bound by arithmetic, not memory, and their dot-product
// form (8 lanes of one sum, a horizontal sum per output, the weights widened again for
// every 3 rows) keeps the FMA units a fifth busy. From WIDE_ROWS rows per weight (on pairs
// from WIDE_ROWS_PAIRS, below) a GEMM takes panels instead: PB = 16 weight rows, KC columns
// at a time, widened once into an
// fp32 buffer laid out k-major (pack[k][j], 16 KiB, in L1), then 6 input rows at a time
// against it, each x[m][k] broadcast into 2 x 8 lanes: 12 accumulators, outer products,
// no horizontal sums. out is [M][PB] in fp32, the sums over K in order of KC blocks.
constexpr int PB = 16;
constexpr int64_t WIDE_ROWS = 16;  // rows per weight from which GEMMs take panels
// On pairs the tiles multiply 32 columns of 4 weight rows by 4 input rows a step, as dense
// in vdpbf16ps as the panels, and they stream the weights while they multiply, where a
// panel reads its block before it multiplies it: tiles stay the faster well past 16 rows.
// A 2-core EPYC (AVX-512 BF16), both in one process, alternated, tiles' time over panels':
// the 32000 x 1024 LM head 0.67-0.75 at 16-32 rows, 0.84-0.85 at 48, 0.92-0.93 at 64, 0.98
// at 96, 1.02-1.08 at 128-256 (one thread and two alike); 1 MB of weights in cache
// 0.88-0.97 at 16-24 rows, 0.97-1.05 at 32-64, 1.09-1.10 at 96; expert FFNs (D 1024,
// F 384) 0.79-0.88 at 16, 0.85-0.97 at 24-32 and 0.93-0.99 at 64 rows per expert,
// 1.02-1.03 at 128. That is the default; `moeflow calibrate --kernels` measures this CPU's and the worker sets it
// (set_panel_rows) for the process.
constexpr int64_t WIDE_ROWS_PAIRS = 160;
std::atomic<int64_t> panel_rows_pairs{WIDE_ROWS_PAIRS};
constexpr int64_t RUN_BYTES = 256 << 10;  // the expert FFN's tile sums of a run, at most

// The rows per weight from which a GEMM of K inputs takes panels, on pairs or not. On pairs
// panel_rows is for K = PANEL_K and scales with K: a tile's cost per output beyond its
// products is the reduction of its sums, which a shorter K spreads over fewer products, and
// panels have none. Measured on the 2-core EPYC (64 experts' cold weights, both paths in
// one process): tiles at least as fast as panels up to 160 rows at K 1024 (D 1024, F 384
// gate/up: 397 against 395 GFLOP/s at 160, 392 against 400 at 256) and up to 64 at K 384
// (their down projection: 318 against 310 at 64, 290 against 311 at 80).
constexpr int64_t PANEL_K = 1024;
inline int64_t wide_rows(bool pairs, int64_t K) {
  if (!pairs) return WIDE_ROWS;
  // capped so that the product cannot overflow (set_panel_rows takes any rows >= 1; past
  // 2^53 it wrapped, and a "never panels" setting took panels from 16 rows)
  const int64_t rows =
      std::min<int64_t>(panel_rows_pairs.load(std::memory_order_relaxed), int64_t(1) << 48);
  return std::max<int64_t>(WIDE_ROWS, rows * std::min<int64_t>(K, PANEL_K) / PANEL_K);
}

int64_t panel_rows() { return panel_rows_pairs.load(); }

void set_panel_rows(int64_t rows) {
  TORCH_CHECK(rows >= 1, "moeflow_cpu.set_panel_rows: rows must be at least 1, got ", rows);
  panel_rows_pairs.store(rows);
}
constexpr int64_t KC = 256;
constexpr int PM = 6;

#ifdef MOEFLOW_X86
// The accumulators are named variables, not an array: GCC kept an array of them in memory
// as well, storing all 12 every step (half the speed).
template <int R>
AVX2_FN void panel_micro(const float* x, int64_t ldx, const float* pack, int64_t kc,
                         float* out) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
#define MOEFLOW_ROWS(DO) \
  DO(0, c00, c01) if (R > 1) DO(1, c10, c11) if (R > 2) DO(2, c20, c21) \
  if (R > 3) DO(3, c30, c31) if (R > 4) DO(4, c40, c41) if (R > 5) DO(5, c50, c51)
#define MOEFLOW_LOAD(i, a, b) { a = _mm256_loadu_ps(out + i * PB); \
                                b = _mm256_loadu_ps(out + i * PB + 8); }
#define MOEFLOW_FMA(i, a, b) { const __m256 xb = _mm256_broadcast_ss(x + i * ldx + k); \
                               a = _mm256_fmadd_ps(xb, w0, a); b = _mm256_fmadd_ps(xb, w1, b); }
#define MOEFLOW_STORE(i, a, b) { _mm256_storeu_ps(out + i * PB, a); \
                                 _mm256_storeu_ps(out + i * PB + 8, b); }
  c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  MOEFLOW_ROWS(MOEFLOW_LOAD)
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(pack + k * PB);
    const __m256 w1 = _mm256_loadu_ps(pack + k * PB + 8);
    MOEFLOW_ROWS(MOEFLOW_FMA)
  }
  MOEFLOW_ROWS(MOEFLOW_STORE)
#undef MOEFLOW_ROWS
#undef MOEFLOW_LOAD
#undef MOEFLOW_FMA
#undef MOEFLOW_STORE
}

// d[i * PB + j] = r[j][i] for i, j < 8: eight 8-lane rows transposed (any 32-bit lanes)
AVX2_FN inline void transpose8(const __m256 (&r)[8], float* d) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(d + 0 * PB, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + 1 * PB, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * PB, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * PB, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * PB, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * PB, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * PB, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * PB, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// pack[k][j] = w[j][k0 + k] for j < nr (0 beyond), k < kc
template <typename W>
AVX2_FN void panel_pack(const W* w, int64_t ldw, int nr, int64_t k0, int64_t kc,
                        float* pack) {
  int j = 0;
  if (std::is_same<W, bf16>::value) {  // 8 rows by 8 columns: widen, then transpose
    for (; j + 8 <= nr; j += 8) {
      int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          const __m128i v = _mm_loadu_si128(
              reinterpret_cast<const __m128i*>(w + (j + i) * ldw + k0 + k));
          r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
        }
        transpose8(r, pack + k * PB + j);
      }
      for (; k < kc; ++k)
        for (int i = 0; i < 8; ++i) pack[k * PB + j + i] = to_float(w[(j + i) * ldw + k0 + k]);
    }
  }
  for (; j < PB; ++j)
    for (int64_t k = 0; k < kc; ++k)
      pack[k * PB + j] = j < nr ? to_float(w[j * ldw + k0 + k]) : 0.f;
}

template <typename W>
AVX2_FN void panel_avx2(const float* x, int64_t ldx, int64_t M, const W* w, int64_t ldw,
                        int nr, int64_t K, float* out, float* pack) {
  std::fill(out, out + M * PB, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, K - k0);
    panel_pack(w, ldw, nr, k0, kc, pack);
    for (int64_t m = 0; m < M; m += PM) {
      const float* xm = x + m * ldx + k0;
      float* om = out + m * PB;
      switch (std::min<int64_t>(PM, M - m)) {
        case 6: panel_micro<6>(xm, ldx, pack, kc, om); break;
        case 5: panel_micro<5>(xm, ldx, pack, kc, om); break;
        case 4: panel_micro<4>(xm, ldx, pack, kc, om); break;
        case 3: panel_micro<3>(xm, ldx, pack, kc, om); break;
        case 2: panel_micro<2>(xm, ldx, pack, kc, om); break;
        default: panel_micro<1>(xm, ldx, pack, kc, om); break;
      }
    }
  }
}
#endif

// Panels on pairs: the 16 weight rows' bf16 pairs k-major (pack[k / 2][j], a pair per
// 32-bit lane, 8 KiB), each input row's pair broadcast to the 16 lanes: one vdpbf16ps per
// row and pair, PM_PAIRS rows at a time (8 accumulators cover its latency).
constexpr int PM_PAIRS = 8;

#ifdef MOEFLOW_BF16_PAIRS
// pack[p][j] = the pair w[j][k0 + 2p], w[j][k0 + 2p + 1] for j < nr (0 beyond), p < kc / 2
// rounded up (an odd last pair's second half 0)
BF16_FN void panel_pack_pairs(const bf16* w, int64_t ldw, int nr, int64_t k0, int64_t kc,
                              uint32_t* pack) {
  const int64_t pairs = (kc + 1) / 2, whole = kc / 2;
  float* dst = reinterpret_cast<float*>(pack);  // the shuffles move 32-bit lanes as they are
  int j = 0;
  for (; j + 8 <= nr; j += 8) {
    int64_t p = 0;
    for (; p + 8 <= whole; p += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(w + (j + i) * ldw + k0 + 2 * p));
      transpose8(r, dst + p * PB + j);
    }
    for (; p < pairs; ++p)
      for (int i = 0; i < 8; ++i) {
        const bf16* src = w + (j + i) * ldw + k0 + 2 * p;
        const uint32_t hi = 2 * p + 1 < kc ? src[1].x : 0;
        pack[p * PB + j + i] = uint32_t(src[0].x) | hi << 16;
      }
  }
  for (; j < PB; ++j)
    for (int64_t p = 0; p < pairs; ++p) {
      const bf16* src = w + j * ldw + k0 + 2 * p;
      pack[p * PB + j] = j >= nr ? 0 : uint32_t(src[0].x) | (2 * p + 1 < kc ? src[1].x : 0) << 16;
    }
}

// out[R][PB] += x[R, kc] . pack: the pairs of each input row broadcast against the packed
// weights; an odd kc's last input is paired with 0. Named accumulators, as panel_micro's.
template <int R>
BF16_FN void panel_micro_pairs(const bf16* x, int64_t ldx, const uint32_t* pack, int64_t kc,
                               float* out) {
  __m512 c0, c1, c2, c3, c4, c5, c6, c7;
#define MOEFLOW_ROWS(DO) \
  DO(0, c0) if (R > 1) DO(1, c1) if (R > 2) DO(2, c2) if (R > 3) DO(3, c3) \
  if (R > 4) DO(4, c4) if (R > 5) DO(5, c5) if (R > 6) DO(6, c6) if (R > 7) DO(7, c7)
#define MOEFLOW_LOAD(i, c) { c = _mm512_loadu_ps(out + i * PB); }
#define MOEFLOW_DOT(i, c) { uint32_t v; std::memcpy(&v, x + i * ldx + 2 * p, 4); \
                            c = dot_pairs(c, _mm512_set1_epi32(int(v)), wv); }
#define MOEFLOW_LAST(i, c) { c = dot_pairs(c, _mm512_set1_epi32(x[i * ldx + kc - 1].x), wv); }
#define MOEFLOW_STORE(i, c) { _mm512_storeu_ps(out + i * PB, c); }
  c1 = c2 = c3 = c4 = c5 = c6 = c7 = _mm512_setzero_ps();
  MOEFLOW_ROWS(MOEFLOW_LOAD)
  const int64_t whole = kc / 2;
  for (int64_t p = 0; p < whole; ++p) {
    const __m512i wv = _mm512_loadu_si512(pack + p * PB);
    MOEFLOW_ROWS(MOEFLOW_DOT)
  }
  if (kc % 2) {
    const __m512i wv = _mm512_loadu_si512(pack + whole * PB);
    MOEFLOW_ROWS(MOEFLOW_LAST)
  }
  MOEFLOW_ROWS(MOEFLOW_STORE)
#undef MOEFLOW_ROWS
#undef MOEFLOW_LOAD
#undef MOEFLOW_DOT
#undef MOEFLOW_LAST
#undef MOEFLOW_STORE
}
#endif

// out[M][PB] = x[M, K] . w[nr, K]^T (nr <= PB; x in natural layout): packed panels on AVX2,
// tiles of NR rows elsewhere. pack: KC * PB floats of scratch.
template <typename W>
void panel(int64_t isa, const float* x, int64_t ldx, int64_t M, const W* w, int64_t ldw,
           int nr, int64_t K, float* out, float* pack) {
#ifdef MOEFLOW_X86
  if (isa >= AVX2) return panel_avx2(x, ldx, M, w, ldw, nr, K, out, pack);
#endif
  std::vector<float> part(((M + MR - 1) / MR) * MR * NR);
  for (int j0 = 0; j0 < nr; j0 += NR) {
    const int n = std::min(NR, nr - j0);
    tile(isa, x, ldx, M, w + j0 * ldw, ldw, n, K, part.data());
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < n; ++j) out[m * PB + j0 + j] = part[m * NR + j];
  }
}

// The same on pairs (x and w bf16).
void panel(int64_t isa, const bf16* x, int64_t ldx, int64_t M, const bf16* w, int64_t ldw,
           int nr, int64_t K, float* out, float* pack) {
  TORCH_CHECK(isa >= AVX512_BF16, "moeflow_cpu: bf16 inputs need the pairs path");
#ifdef MOEFLOW_BF16_PAIRS
  uint32_t* pairs = reinterpret_cast<uint32_t*>(pack);
  std::fill(out, out + M * PB, 0.f);
  // the next panel's weights (contiguous when ldw == K) prefetched into L2 a block's share
  // at a time, so that memory streams while the blocks are multiplied
  const char* next = reinterpret_cast<const char*>(w + nr * ldw);
  const int64_t bytes = nr * K * 2;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, K - k0);
    for (const char* a = next + bytes * k0 / K; a < next + bytes * (k0 + kc) / K; a += 64)
      _mm_prefetch(a, _MM_HINT_T1);
    panel_pack_pairs(w, ldw, nr, k0, kc, pairs);
    for (int64_t m = 0; m < M; m += PM_PAIRS) {
      const bf16* xm = x + m * ldx + k0;
      float* om = out + m * PB;
      switch (std::min<int64_t>(PM_PAIRS, M - m)) {
        case 8: panel_micro_pairs<8>(xm, ldx, pairs, kc, om); break;
        case 7: panel_micro_pairs<7>(xm, ldx, pairs, kc, om); break;
        case 6: panel_micro_pairs<6>(xm, ldx, pairs, kc, om); break;
        case 5: panel_micro_pairs<5>(xm, ldx, pairs, kc, om); break;
        case 4: panel_micro_pairs<4>(xm, ldx, pairs, kc, om); break;
        case 3: panel_micro_pairs<3>(xm, ldx, pairs, kc, om); break;
        case 2: panel_micro_pairs<2>(xm, ldx, pairs, kc, om); break;
        default: panel_micro_pairs<1>(xm, ldx, pairs, kc, om); break;
      }
    }
  }
#endif
}

int64_t grain(int64_t tile_bytes) {
  return std::max<int64_t>(1, CHUNK_BYTES / std::max<int64_t>(1, tile_bytes));
}

// f(t0, t1) over tasks [0, n) cut into at most torch's threads contiguous chunks of about
// equal cost(t), each of `grain` tasks at least, in parallel. at::parallel_for cuts by count:
// the routed experts' tasks cost by their rows (a 512-token prefill over 64 experts gives
// them 49-80 each), and each pass ends at a barrier where the thread with less waits.
template <typename Cost, typename F>
void parallel_by_cost(int64_t n, int64_t grain_tasks, const Cost& cost, const F& f) {
  const int64_t parts =
      std::min<int64_t>(at::get_num_threads(), (n + grain_tasks - 1) / grain_tasks);
  if (parts <= 1) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + cost(t);
  std::vector<int64_t> cut(parts + 1, n);
  cut[0] = 0;
  for (int64_t p = 1; p < parts; ++p)
    cut[p] = std::max(cut[p - 1], static_cast<int64_t>(
        std::lower_bound(prefix.begin(), prefix.end(), prefix[n] * p / parts) -
        prefix.begin()));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      if (cut[p] < cut[p + 1]) f(cut[p], cut[p + 1]);
  });
}

// A task's cost in a routed-expert pass, in weight rows times input rows: its rows are
// multiplied, its weights streamed once (at a few rows the stream is the cost: reading a
// weight from memory takes about as long as multiplying it with a dozen rows here)
constexpr double STREAM_ROWS = 12.0;

// Where input k of a row sits once widened: bf16 weights on AVX2 read each block of 16 as
// its 8 even elements, then its 8 odd ones (see load16); elements past the last whole block,
// and every element on the other paths, stay in place.
struct Layout {
  bool split;
  int64_t body;
  template <typename W>
  static Layout of(int64_t isa, int64_t K) {
    return {isa >= AVX2 && std::is_same<W, bf16>::value, K / 16 * 16};
  }
  int64_t operator()(int64_t k) const {
    return split && k < body ? (k & ~int64_t(15)) | ((k & 1) << 3) | ((k & 15) >> 1) : k;
  }
};

// Rows of src (through `rows`, or the first n) as a GEMM takes them: widened to fp32 in
// Layout order, or kept in bf16 (X = T = bf16: a copy).
template <typename T, typename X>
void widen_rows(const T* src, int64_t K, const int64_t* rows, int64_t n, Layout at,
                X* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + (rows ? rows[r] : r) * K;
    X* d = dst + r * K;
    if (std::is_same<T, X>::value && !at.split)
      std::copy(s, s + K, d);
    else
      for (int64_t k = 0; k < K; ++k) d[at(k)] = X(to_float(s[k]));
  }
}

void check_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "moeflow_cpu: ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == dim, "moeflow_cpu: ", name, " must have ", dim, " dims, got ",
              t.dim());
  TORCH_CHECK(t.is_contiguous(), "moeflow_cpu: ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "moeflow_cpu: takes bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "moeflow_cpu: ", name, " is ",
              w.scalar_type(), ", the input ", x.scalar_type());
}

// y [M, N] = x [M, K] . w [N, K]^T (+ bias [N])
template <typename T>
void linear_impl(int64_t isa, const at::Tensor& x, const at::Tensor& w,
                 const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool wide = M >= wide_rows(pairs_bf16<T>(isa), K);
  const T* wp = w.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int TW = wide ? PB : NR;  // weight rows per task, and the row stride of its sums
  const int64_t out_len = wide ? M * PB : ((M + MR - 1) / MR) * MR * NR;
  auto run = [&](const auto* xs) {  // x's rows as the path takes them: fp32, or bf16 pairs
    at::parallel_for(0, (N + TW - 1) / TW, grain(TW * K * sizeof(T)), [&](int64_t t0, int64_t t1) {
      std::vector<float> out(out_len), pack(wide ? KC * PB : 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * TW;
        const int nr = static_cast<int>(std::min<int64_t>(TW, N - n0));
        if (wide)
          panel(isa, xs, K, M, wp + n0 * K, K, nr, K, out.data(), pack.data());
        else
          tile(isa, xs, K, M, wp + n0 * K, K, nr, K, out.data());
        for (int64_t m = 0; m < M; ++m)
          for (int j = 0; j < nr; ++j)
            yp[m * N + n0 + j] = T(out[m * TW + j] + (bp ? to_float(bp[n0 + j]) : 0.f));
      }
    });
  };
  if constexpr (std::is_same<T, bf16>::value) {
    if (pairs_bf16<T>(isa)) return run(x.data_ptr<bf16>());  // as it is
  }
  std::vector<float> xf(M * K);
  widen_rows(x.data_ptr<T>(), K, nullptr, M,
             wide ? Layout{false, 0} : Layout::of<T>(isa, K), xf.data());
  run(xf.data());
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  int64_t isa) {
  check_cpu(x, "x", 2);
  check_cpu(w, "w", 2);
  check_dtype(x, w, "w");
  TORCH_CHECK(x.size(1) == w.size(1) && x.size(1) > 0, "moeflow_cpu.linear: x is [",
              x.size(0), ", ", x.size(1), "], w [", w.size(0), ", ", w.size(1), "]");
  if (bias) {
    check_cpu(*bias, "bias", 1);
    check_dtype(x, *bias, "bias");
    TORCH_CHECK(bias->size(0) == w.size(0), "moeflow_cpu.linear: bias has ", bias->size(0),
                " entries for ", w.size(0), " outputs");
  }
  isa = resolve(isa);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.size(0) == 0 || w.size(0) == 0) return y;
  if (x.scalar_type() == at::kBFloat16)
    linear_impl<bf16>(isa, x, w, bias, y);
  else
    linear_impl<float>(isa, x, w, bias, y);
  return y;
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// v rounded to T and back: the fused op rounds where torch's unfused ops store in the model
// dtype (gate/up outputs, SiLU, the product, the down output, the scale and the scaled
// output), so that it agrees with them, and a GEMM's result does not depend on its path.
template <typename T>
inline float round_to(float v) { return static_cast<float>(T(v)); }

// silu(g) * u, rounded where torch's unfused ops store
template <typename T, typename X>
inline X swiglu_one(float g, float u) {
  return X(round_to<T>(round_to<T>(silu(round_to<T>(g))) * round_to<T>(u)));
}

#ifdef MOEFLOW_X86
// swiglu_row and scaled_row on 8 lanes, a partial last step included
template <typename T, typename X>
AVX2_FN void swiglu_row_avx2(const float* g, const float* u, int n, X* a) {
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 gv = round8<T>(_mm256_loadu_ps(g + j));
    if (_mm256_movemask_ps(_mm256_cmp_ps(gv, _mm256_set1_ps(-87.f), _CMP_LT_OQ))) {
      for (int i = j; i < j + 8; ++i)  // exp(-g) near or past overflow: as the tail does
        a[i] = swiglu_one<T, X>(g[i], u[i]);
      continue;
    }
    store8(a + j, round8<T>(_mm256_mul_ps(round8<T>(silu8(gv)),
                                          round8<T>(_mm256_loadu_ps(u + j)))));
  }
  const int rest = n - j;
  if (rest > 0) {  // the last few on the lanes too (zeros beside them): the tiles' rows are
    // 4 wide, and their SiLU-and-mul took a fifth of a decode-sized expert FFN's time scalar
    alignas(32) float gt[8] = {}, ut[8] = {};
    std::memcpy(gt, g + j, rest * sizeof(float));
    std::memcpy(ut, u + j, rest * sizeof(float));
    const __m256 gv = round8<T>(_mm256_load_ps(gt));
    if (_mm256_movemask_ps(_mm256_cmp_ps(gv, _mm256_set1_ps(-87.f), _CMP_LT_OQ))) {
      for (int i = j; i < n; ++i) a[i] = swiglu_one<T, X>(g[i], u[i]);
      return;
    }
    X out[8];
    store8(out, round8<T>(_mm256_mul_ps(round8<T>(silu8(gv)), round8<T>(_mm256_load_ps(ut)))));
    std::memcpy(a + j, out, rest * sizeof(X));
  }
}

template <typename T>
AVX2_FN void scaled_row_avx2(const float* v, int n, float s, T* y) {
  int j = 0;
  const __m256 sv = _mm256_set1_ps(s);
  for (; j + 8 <= n; j += 8)
    store8(y + j, round8<T>(_mm256_mul_ps(sv, round8<T>(_mm256_loadu_ps(v + j)))));
  const int rest = n - j;
  if (rest > 0) {  // the last few on the lanes too, as swiglu_row_avx2's
    alignas(32) float vt[8] = {};
    std::memcpy(vt, v + j, rest * sizeof(float));
    T out[8];
    store8(out, round8<T>(_mm256_mul_ps(sv, round8<T>(_mm256_load_ps(vt)))));
    std::memcpy(y + j, out, rest * sizeof(T));
  }
}
#endif

// a[j] = silu(g[j]) * u[j] for j < n, rounded where torch's unfused ops store (see
// round_to): 8 lanes at a time on AVX2 (exp8: within a few float ulps of std::exp, the
// scalar path's), where the prefill's expert FFN spent a seventh of its time in std::exp
// and the scalar roundings
template <typename T, typename X>
void swiglu_row(int64_t isa, const float* g, const float* u, int n, X* a) {
#ifdef MOEFLOW_X86
  if (isa >= AVX2) return swiglu_row_avx2<T>(g, u, n, a);
#endif
  for (int j = 0; j < n; ++j) a[j] = swiglu_one<T, X>(g[j], u[j]);
}

// y[j] = s * v[j] for j < n, v rounded to T first
template <typename T>
void scaled_row(int64_t isa, const float* v, int n, float s, T* y) {
#ifdef MOEFLOW_X86
  if (isa >= AVX2) return scaled_row_avx2<T>(v, n, s, y);
#endif
  for (int j = 0; j < n; ++j) y[j] = T(s * round_to<T>(v[j]));
}

// The routed experts of a node: rows expert-major through order, SwiGLU per expert, each
// row scaled and written back at its place in x. X: the GEMMs' input rows, fp32 or (on the
// pairs path) bf16.
template <typename T, typename X>
void expert_ffn_impl(int64_t isa, const at::Tensor& x, const int64_t* order,
                     const std::vector<int64_t>& counts, const at::Tensor& gate_up,
                     const at::Tensor& down, const float* scale, at::Tensor& y) {
  const int64_t n = x.size(0), D = x.size(1), F = down.size(2);
  std::vector<int64_t> experts, starts;  // the experts with rows, and their first row
  int64_t row = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] > 0) {
      experts.push_back(static_cast<int64_t>(e));
      starts.push_back(row);
    }
    row += counts[e];
  }
  const int64_t active = static_cast<int64_t>(experts.size());
  // Each expert's pass on panels from wide_rows rows, on tiles below (a skewed prefill has
  // both; on pairs the down projection, of F inputs, takes panels from fewer rows than the
  // gate/up one, of D): its input rows in the layout of its path, its tasks TW weight rows
  // wide.
  constexpr bool pairs = std::is_same<X, bf16>::value;  // natural layout on pairs
  std::vector<char> wide_up(active), wide_down(active);
  int64_t out_len = 0, tile_len = 0;  // sums of a task: any expert's, a tiled expert's
  bool any_wide = false;
  for (int64_t i = 0; i < active; ++i) {
    const int64_t rows = counts[experts[i]];
    wide_up[i] = rows >= wide_rows(pairs, D);
    wide_down[i] = rows >= wide_rows(pairs, F);
    any_wide = any_wide || wide_up[i] || wide_down[i];
    if (!wide_up[i] || !wide_down[i])
      tile_len = std::max(tile_len, ((rows + MR - 1) / MR) * MR * NR);
    if (wide_up[i] || wide_down[i]) out_len = std::max(out_len, rows * PB);
  }
  out_len = std::max(out_len, tile_len);
  const Layout natural{false, 0}, x_split = pairs ? natural : Layout::of<T>(isa, D),
               a_split = pairs ? natural : Layout::of<T>(isa, F);
  // [n, D], expert-major; every element written before it is read, so left uninitialized
  // (zeroing it and `a` was 11 MB of stores a layer at a 512-token prefill)
  const std::unique_ptr<X[]> xf_rows(new X[n * D]);
  X* const xf = xf_rows.get();
  for (int64_t i = 0; i < active; ++i) {
    const int64_t r0 = starts[i], rows = counts[experts[i]];
    widen_rows(x.data_ptr<T>() + (order ? 0 : r0 * D), D, order ? order + r0 : nullptr, rows,
               wide_up[i] ? natural : x_split, xf + r0 * D);
  }
  // the tasks of a pass: (expert index, first weight row, weight rows)
  struct Task {
    int64_t i, first;
    int nr;
  };
  auto tasks_of = [&](int64_t width, const std::vector<char>& wide) {
    std::vector<Task> tasks;
    for (int64_t i = 0; i < active; ++i) {
      const int tw = wide[i] ? PB : NR;
      for (int64_t f0 = 0; f0 < width; f0 += tw)
        tasks.push_back({i, f0, static_cast<int>(std::min<int64_t>(tw, width - f0))});
    }
    return tasks;
  };
  // sums[rows][PB or NR] = xs[rows, K] . w[nr, K]^T, on panels or tiles
  auto gemm = [&](bool wide, const X* xs, int64_t rows, const T* w, int nr, int64_t K,
                  float* sums, float* pack) {
    if (wide)
      panel(isa, xs, K, rows, w, K, nr, K, sums, pack);
    else
      tile(isa, xs, K, rows, w, K, nr, K, sums);
  };

  // The end of a run of tasks from t (to at most t1): a tiled expert's tasks in the chunk,
  // a panel task alone. A run reads all its gate rows, then all its up rows (or its down
  // rows), and only then writes its outputs. Runs of at most 8 tile tasks streamed slower,
  // about as much slower as against plain GEMVs over the same weights: 64 experts of D
  // 1024, F 384, 8 active, side by side in one process, this against runs of 8: 1.08-1.22x
  // at 1-2 rows per expert and 1.06x at 4 on one thread, 1.08-1.16x at 1-4 rows and 1.07x
  // at 12 on two, the same at 24 (panels). A run's outputs wait in slots of tile_len
  // floats, at most RUN_BYTES of them: with tiles up to 64 rows, an expert of Mixtral's
  // F 14336 would hold 3.6 MB of gate sums (and as many of up sums) a thread, zeroed each
  // call; the runs of the benchmark's shapes (F 384, D 1024) stay whole.
  const int64_t most_tasks =
      std::max<int64_t>(1, RUN_BYTES / std::max<int64_t>(1, tile_len * sizeof(float)));
  auto run_end = [&](const std::vector<Task>& tasks, const std::vector<char>& wide, int64_t t,
                     int64_t t1) {
    int64_t end = t + 1;
    if (!wide[tasks[t].i])
      while (end < t1 && end - t < most_tasks && tasks[end].i == tasks[t].i) ++end;
    return end;
  };
  // the most tasks a run has in a pass over `width` weight rows: its slots
  auto longest_run = [&](int64_t width) {
    return std::min<int64_t>((width + NR - 1) / NR, most_tasks);
  };
  // row m of a run's tile outputs (tasks t..end, one slot of tile_len each), side by side
  auto gather_row = [&](float* dst, const float* slots, int64_t t, int64_t end, int64_t m) {
    for (int64_t s = t; s < end; ++s)
      std::memcpy(dst + (s - t) * NR, slots + (s - t) * tile_len + m * NR, NR * sizeof(float));
  };

  // [n, F] silu(gate) * up, each expert in its down path's layout
  const std::unique_ptr<X[]> a_rows(new X[n * F]);
  X* const a = a_rows.get();
  const T* gu = gate_up.data_ptr<T>();
  const std::vector<Task> up_tasks = tasks_of(F, wide_up);
  auto task_cost = [&](const std::vector<Task>& tasks) {
    return [&](int64_t t) {
      return tasks[t].nr * (counts[experts[tasks[t].i]] + STREAM_ROWS);
    };
  };
  parallel_by_cost(static_cast<int64_t>(up_tasks.size()), grain(2 * NR * D * sizeof(T)),
                   task_cost(up_tasks), [&](int64_t t0, int64_t t1) {
    // A run of an expert's tile tasks reads its gate rows, then its up rows: gate and up
    // alternating a tile (8 KiB) at a time streamed slower (64 experts, 8 active, 1 row
    // each: 27.1 -> 29.6 GB/s with runs of 8; 4 rows each: 19.7 -> 24.5), and so did runs
    // of 8 (see run_end). A panel task runs alone: its slots are a tiled expert's size.
    const int64_t run = longest_run(F), run_len = std::max(out_len, tile_len * run);
    std::vector<float> g(run_len), u(run_len), pack(any_wide ? KC * PB : 0);
    std::vector<float> gr(run * NR), ur(run * NR);  // a row's outputs of a run
    for (int64_t t = t0; t < t1;) {
      const int64_t i = up_tasks[t].i, end = run_end(up_tasks, wide_up, t, t1);
      const int64_t e = experts[i], rows = counts[e], r0 = starts[i];
      const int64_t tw = wide_up[i] ? PB : NR;
      const Layout at = wide_down[i] ? natural : a_split;
      const T* w = gu + e * 2 * F * D;
      for (int64_t s = t; s < end; ++s)
        gemm(wide_up[i], xf + r0 * D, rows, w + up_tasks[s].first * D, up_tasks[s].nr,
             D, g.data() + (s - t) * tile_len, pack.data());
      for (int64_t s = t; s < end; ++s)
        gemm(wide_up[i], xf + r0 * D, rows, w + (F + up_tasks[s].first) * D,
             up_tasks[s].nr, D, u.data() + (s - t) * tile_len, pack.data());
      if (!wide_up[i] && !at.split) {  // a row's outputs of the run gathered: one pass each
        const int64_t f0 = up_tasks[t].first;
        const int width = static_cast<int>(up_tasks[end - 1].first + up_tasks[end - 1].nr - f0);
        for (int64_t m = 0; m < rows; ++m) {
          gather_row(gr.data(), g.data(), t, end, m);
          gather_row(ur.data(), u.data(), t, end, m);
          swiglu_row<T>(isa, gr.data(), ur.data(), width, &a[(r0 + m) * F + f0]);
        }
        t = end;
        continue;
      }
      for (int64_t s = t; s < end; ++s) {
        const float* gs = g.data() + (s - t) * tile_len;
        const float* us = u.data() + (s - t) * tile_len;
        const int64_t f0 = up_tasks[s].first;
        for (int64_t m = 0; m < rows; ++m) {
          if (!at.split) {  // the row's outputs side by side
            swiglu_row<T>(isa, gs + m * tw, us + m * tw, up_tasks[s].nr, &a[(r0 + m) * F + f0]);
            continue;
          }
          for (int j = 0; j < up_tasks[s].nr; ++j)
            a[(r0 + m) * F + at(f0 + j)] = swiglu_one<T, X>(gs[m * tw + j], us[m * tw + j]);
        }
      }
      t = end;
    }
  });

  const T* dp = down.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const std::vector<Task> down_tasks = tasks_of(D, wide_down);
  parallel_by_cost(static_cast<int64_t>(down_tasks.size()), grain(NR * F * sizeof(T)),
                   task_cost(down_tasks), [&](int64_t t0, int64_t t1) {
    // runs of an expert's tile tasks, as above, so that a row's outputs are scaled and
    // stored in one pass (4 at a time, the pass's setup was a third of its cost)
    const int64_t run = longest_run(D);
    std::vector<float> out(std::max(out_len, tile_len * run)), pack(any_wide ? KC * PB : 0);
    std::vector<float> vr(run * NR);
    for (int64_t t = t0; t < t1;) {
      const int64_t i = down_tasks[t].i, end = run_end(down_tasks, wide_down, t, t1);
      const int64_t e = experts[i], rows = counts[e], r0 = starts[i];
      const int64_t d0 = down_tasks[t].first, tw = wide_down[i] ? PB : NR;
      for (int64_t s = t; s < end; ++s)
        gemm(wide_down[i], a + r0 * F, rows, dp + (e * D + down_tasks[s].first) * F,
             down_tasks[s].nr, F, out.data() + (s - t) * tile_len, pack.data());
      const int width = static_cast<int>(down_tasks[end - 1].first + down_tasks[end - 1].nr - d0);
      for (int64_t m = 0; m < rows; ++m) {
        const int64_t dest = order ? order[r0 + m] : r0 + m;
        const float s = scale ? round_to<T>(scale[dest]) : 1.f;
        const float* v = out.data() + m * tw;
        if (!wide_down[i]) {
          gather_row(vr.data(), out.data(), t, end, m);
          v = vr.data();
        }
        scaled_row(isa, v, width, s, yp + dest * D + d0);
      }
      t = end;
    }
  });
}

// An optional [n] tensor of expert_ffn's, checked: its data, or nullptr when absent.
template <typename V>
const V* optional_rows(const c10::optional<at::Tensor>& t, const char* name,
                       at::ScalarType dtype, int64_t n) {
  if (!t) return nullptr;
  check_cpu(*t, name, 1);
  TORCH_CHECK(t->scalar_type() == dtype && t->size(0) == n, "moeflow_cpu.expert_ffn: ", name,
              " must be ", dtype == at::kLong ? "int64" : "float32", " [", n, "]");
  return t->data_ptr<V>();
}

at::Tensor expert_ffn(const at::Tensor& x, const c10::optional<at::Tensor>& order,
                      at::IntArrayRef counts, const at::Tensor& gate_up,
                      const at::Tensor& down, const c10::optional<at::Tensor>& scale,
                      int64_t isa) {
  check_cpu(x, "x", 2);
  check_cpu(gate_up, "gate_up", 3);
  check_cpu(down, "down", 3);
  check_dtype(x, gate_up, "gate_up");
  check_dtype(x, down, "down");
  const int64_t n = x.size(0), D = x.size(1), G = gate_up.size(0), F = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * F && gate_up.size(2) == D && down.size(0) == G &&
                  down.size(1) == D && D > 0 && F > 0,
              "moeflow_cpu.expert_ffn: x [", n, ", ", D, "], gate_up [", gate_up.size(0), ", ",
              gate_up.size(1), ", ", gate_up.size(2), "] and down [", down.size(0), ", ",
              down.size(1), ", ", down.size(2), "] do not agree");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == G, "moeflow_cpu.expert_ffn: ",
              counts.size(), " counts for ", G, " experts");
  int64_t total = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, "moeflow_cpu.expert_ffn: a negative count");
    total += c;
  }
  TORCH_CHECK(total == n, "moeflow_cpu.expert_ffn: counts sum to ", total, ", x has ", n,
              " rows");
  const int64_t* order_p = optional_rows<int64_t>(order, "order", at::kLong, n);
  if (order_p) {
    std::vector<bool> seen(n, false);  // each row once: else rows stay unwritten, or race
    for (int64_t r = 0; r < n; ++r) {
      TORCH_CHECK(order_p[r] >= 0 && order_p[r] < n, "moeflow_cpu.expert_ffn: order[", r,
                  "] = ", order_p[r], " is out of range");
      TORCH_CHECK(!seen[order_p[r]], "moeflow_cpu.expert_ffn: order is not a permutation (",
                  order_p[r], " twice)");
      seen[order_p[r]] = true;
    }
  }
  const float* scale_p = optional_rows<float>(scale, "scale", at::kFloat, n);
  isa = resolve(isa);
  at::Tensor y = at::empty({n, D}, x.options());
  if (n == 0) return y;
  const std::vector<int64_t> c(counts.begin(), counts.end());
  if (x.scalar_type() != at::kBFloat16)
    expert_ffn_impl<float, float>(isa, x, order_p, c, gate_up, down, scale_p, y);
  else if (pairs_bf16<bf16>(isa))
    expert_ffn_impl<bf16, bf16>(isa, x, order_p, c, gate_up, down, scale_p, y);
  else
    expert_ffn_impl<bf16, float>(isa, x, order_p, c, gate_up, down, scale_p, y);
  return y;
}

// ---- decode attention over the paged KV cache -------------------------------------

template <typename T>
float dot(const float* q, const T* k, int64_t d) {
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 4 <= d; i += 4)
    for (int u = 0; u < 4; ++u) s[u] += q[i + u] * to_float(k[i + u]);
  float sum = (s[0] + s[1]) + (s[2] + s[3]);
  for (; i < d; ++i) sum += q[i] * to_float(k[i]);
  return sum;
}

template <typename T>
void axpy(float a, const T* v, int64_t d, float* acc) {
  for (int64_t i = 0; i < d; ++i) acc[i] += a * to_float(v[i]);
}

constexpr int64_t KEY_CHUNK = 32;  // keys scored before the running softmax is rescaled

#ifdef MOEFLOW_X86
// The running softmax of one query head over a chunk's n scores s (room for n rounded up to
// 8, 32-byte aligned): where the chunk's maximum rises above m, the sums so far (ag [d],
// l) are rescaled to it; s becomes the exponentials, and their sum is added to l.
AVX2_FN inline void softmax_chunk(float* s, int64_t n, int64_t d, float* ag, float* m,
                                  float* l) {
  const int64_t padded = (n + 7) / 8 * 8;
  float top = *m;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
  if (top > *m) {
    const float c = std::exp(*m - top);
    *l *= c;
    for (int64_t i = 0; i < d; ++i) ag[i] *= c;
    *m = top;
  }
  for (int64_t j = n; j < padded; ++j) s[j] = top;  // exp(0): never summed or used
  const __m256 topv = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < padded; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(s + j), topv));
    _mm256_store_ps(s + j, e);
    if (j + 8 <= n) total = _mm256_add_ps(total, e);
  }
  float sum = hsum(total);
  for (int64_t j = n / 8 * 8; j < n; ++j) sum += s[j];
  *l += sum;
}

constexpr int64_t HEADS_AT_ONCE = 4;  // query heads whose sums stay in registers together

// One chunk of n keys for GB query heads (qg [GB, d] in Layout order, scaled; ag [GB, d]
// their running sums, m and l their running maxima and normalizers): each key and each
// value is loaded and widened once for the GB heads, whose sums stay in registers, and the
// exponentials are taken 8 at a time.
template <int GB, typename T>
AVX2_FN void attend_chunk_avx2(const float* qg, int64_t d, const T* const* keys,
                               const T* const* values, int64_t n, float* ag, float* m,
                               float* l) {
  const int64_t body = d / 16 * 16;
  alignas(32) float s[GB][KEY_CHUNK];
  for (int64_t j = 0; j < n; ++j) {  // scores
    __m256 a[GB][2];
    for (int g = 0; g < GB; ++g) a[g][0] = a[g][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < body; i += 16) {
      const Step16 kv = load16(keys[j] + i);
      for (int g = 0; g < GB; ++g) {
        a[g][0] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + g * d + i), kv.lo, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + g * d + i + 8), kv.hi, a[g][1]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      float sum = hsum(_mm256_add_ps(a[g][0], a[g][1]));
      for (int64_t i = body; i < d; ++i) sum += qg[g * d + i] * to_float(keys[j][i]);
      s[g][j] = sum;
    }
  }
  for (int g = 0; g < GB; ++g) softmax_chunk(s[g], n, d, ag + g * d, &m[g], &l[g]);
  for (int64_t i = 0; i < body; i += 16) {  // values, weighted by the exponentials
    __m256 a[GB][2];
    for (int g = 0; g < GB; ++g) {
      a[g][0] = _mm256_loadu_ps(ag + g * d + i);
      a[g][1] = _mm256_loadu_ps(ag + g * d + i + 8);
    }
    for (int64_t j = 0; j < n; ++j) {
      const Step16 vv = load16(values[j] + i);
      for (int g = 0; g < GB; ++g) {
        const __m256 w = _mm256_broadcast_ss(s[g] + j);
        a[g][0] = _mm256_fmadd_ps(w, vv.lo, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(w, vv.hi, a[g][1]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      _mm256_storeu_ps(ag + g * d + i, a[g][0]);
      _mm256_storeu_ps(ag + g * d + i + 8, a[g][1]);
    }
  }
  for (int64_t i = body; i < d; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float(values[j][i]);
      for (int g = 0; g < GB; ++g) ag[g * d + i] += s[g][j] * v;
    }
}

// Decode attention of one sequence for kv heads [kh0, kh1), AVX2: the keys in chunks; per
// chunk every kv head of the range in turn (so each slot's pages and lines are used by all
// of them while the chunk is in cache), its query heads HEADS_AT_ONCE at a time; the next
// chunk's slots are prefetched meanwhile. q, out: the sequence's [H, d].
template <typename T>
AVX2_FN void attend_seq_avx2(const T* q, int64_t G, int64_t d, const T* pool, int64_t W,
                             const int64_t* table, int64_t block_size, int64_t kv_heads,
                             int64_t kh0, int64_t kh1, int64_t lo, int64_t hi, float scale,
                             T* out) {
  const Layout at = Layout::of<T>(AVX2, d);
  const int64_t heads = (kh1 - kh0) * G, first = kh0 * G;
  std::vector<float> qf(heads * d), acc(heads * d, 0.f), m(heads, -INFINITY), l(heads, 0.f);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i)
      qf[h * d + at(i)] = to_float(q[(first + h) * d + i]) * scale;
  auto slot = [&](int64_t p) {
    return pool + (table[p / block_size] * block_size + p % block_size) * W;
  };
  const int64_t line = 64 / static_cast<int64_t>(sizeof(T));  // elements per cache line
  const T* slots[KEY_CHUNK];
  const T* keys[KEY_CHUNK];
  const T* values[KEY_CHUNK];
  for (int64_t p0 = lo; p0 < hi; p0 += KEY_CHUNK) {
    const int64_t n = std::min(KEY_CHUNK, hi - p0);
    for (int64_t j = 0; j < n; ++j) slots[j] = slot(p0 + j);
    for (int64_t p = p0 + KEY_CHUNK; p < std::min(p0 + 2 * KEY_CHUNK, hi); ++p) {
      const T* next = slot(p);  // the range's keys, then its values
      for (int64_t i = kh0 * d; i < kh1 * d; i += line)
        _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T1);
      for (int64_t i = (kv_heads + kh0) * d; i < (kv_heads + kh1) * d; i += line)
        _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T1);
    }
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      for (int64_t j = 0; j < n; ++j) {
        keys[j] = slots[j] + kh * d;
        values[j] = slots[j] + (kv_heads + kh) * d;
      }
      for (int64_t g0 = 0; g0 < G; g0 += HEADS_AT_ONCE) {
        const int64_t h = (kh - kh0) * G + g0;
        const float* qg = qf.data() + h * d;
        float* ag = acc.data() + h * d;
        switch (std::min(HEADS_AT_ONCE, G - g0)) {
          case 4: attend_chunk_avx2<4>(qg, d, keys, values, n, ag, &m[h], &l[h]); break;
          case 3: attend_chunk_avx2<3>(qg, d, keys, values, n, ag, &m[h], &l[h]); break;
          case 2: attend_chunk_avx2<2>(qg, d, keys, values, n, ag, &m[h], &l[h]); break;
          default: attend_chunk_avx2<1>(qg, d, keys, values, n, ag, &m[h], &l[h]);
        }
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i)
      out[(first + h) * d + i] =
          T(l[h] > 0.f || std::isnan(l[h]) ? acc[h * d + at(i)] / l[h] : 0.f);
}
#endif

#ifdef MOEFLOW_BF16_PAIRS
// ---- decode attention on bf16 pairs (AVX-512 BF16) ---------------------------------------
//
// The AVX2 path above widens every key and value to fp32 and takes a horizontal sum per key
// and query head, and reached a fifth of the KV read's roofline here. On pairs, a key's
// scores are vdpbf16ps of the bf16 query against the bf16 key as they are (32 products an
// instruction), 16 keys' sums reduced together by a transposing tree (3 instructions a
// score instead of a horizontal sum each), the scale applied to the sum in fp32 as the
// reference does; the values are widened 16 lanes at a time and weighted in fp32 (the
// probabilities are not rounded to bf16), prefetched into L1 while the scores are taken.
// One layer of Mixtral's heads (32 query, 8 KV of 128), 2 threads, on a 2-core EPYC:
// 64 sequences of 512 keys 13.6-14.0 -> 8.0-8.2 ms, 16 of 2,048 13.0-14.5 -> 8.0-8.2.

// 16 bf16 widened to fp32 (lanes past the mask 0)
BF16_FN inline __m512 widen16(const bf16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// One chunk of n <= KEY_CHUNK keys for GB query heads (qg [GB, d] in bf16; ag, m, l as in
// attend_chunk_avx2).
template <int GB>
BF16_FN void attend_chunk_pairs(const bf16* qg, int64_t d, float scale,
                                const bf16* const* keys, const bf16* const* values, int64_t n,
                                float* ag, float* m, float* l) {
  alignas(64) float s[GB][KEY_CHUNK];
  const int64_t steps = (d + 31) / 32;
  const __mmask32 tail = d % 32 ? static_cast<__mmask32>((uint64_t(1) << (d % 32)) - 1)
                                : ~__mmask32(0);
  for (int64_t j = 0; j < n; ++j)  // the values into L1 while the scores are taken
    for (int64_t i = 0; i < d; i += 32)
      _mm_prefetch(reinterpret_cast<const char*>(values[j] + i), _MM_HINT_T0);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {  // scores, 16 keys at a time
    const bf16* key[16];
    for (int jj = 0; jj < 16; ++jj) key[jj] = keys[j0 + jj < n ? j0 + jj : j0];  // past n: unused
    for (int g = 0; g < GB; ++g) {
      __m512 a[16];
      for (int jj = 0; jj < 16; ++jj) a[jj] = _mm512_setzero_ps();
      for (int64_t t = 0; t < steps; ++t) {
        const __mmask32 mask = t + 1 < steps ? ~__mmask32(0) : tail;
        const __m512i qv = _mm512_maskz_loadu_epi16(mask, qg + g * d + 32 * t);
        for (int jj = 0; jj < 16; ++jj)
          a[jj] = dot_pairs(a[jj], _mm512_maskz_loadu_epi16(mask, key[jj] + 32 * t), qv);
      }
      _mm512_store_ps(s[g] + j0, _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale)));
    }
  }
  for (int g = 0; g < GB; ++g) softmax_chunk(s[g], n, d, ag + g * d, &m[g], &l[g]);
  for (int64_t i = 0; i < d; i += 32) {  // values, weighted by the exponentials: 32 lanes of
    const int64_t left = d - i;          // each head's sums in registers
    const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF)
                         : left > 16 ? __mmask16((1u << (left - 16)) - 1) : __mmask16(0);
    __m512 a[GB][2];
    for (int g = 0; g < GB; ++g) {
      a[g][0] = _mm512_maskz_loadu_ps(m0, ag + g * d + i);
      a[g][1] = _mm512_maskz_loadu_ps(m1, ag + g * d + i + 16);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512 v0 = widen16(values[j] + i, m0), v1 = widen16(values[j] + i + 16, m1);
      for (int g = 0; g < GB; ++g) {
        const __m512 w = _mm512_set1_ps(s[g][j]);
        a[g][0] = _mm512_fmadd_ps(w, v0, a[g][0]);
        a[g][1] = _mm512_fmadd_ps(w, v1, a[g][1]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      _mm512_mask_storeu_ps(ag + g * d + i, m0, a[g][0]);
      _mm512_mask_storeu_ps(ag + g * d + i + 16, m1, a[g][1]);
    }
  }
}

// attend_seq_avx2 on pairs: q and the cache bf16, the sums in fp32 in natural order
BF16_FN void attend_seq_pairs(const bf16* q, int64_t G, int64_t d, const bf16* pool,
                              int64_t W, const int64_t* table, int64_t block_size,
                              int64_t kv_heads, int64_t kh0, int64_t kh1, int64_t lo,
                              int64_t hi, float scale, bf16* out) {
  const int64_t heads = (kh1 - kh0) * G, first = kh0 * G;
  std::vector<float> acc(heads * d, 0.f), m(heads, -INFINITY), l(heads, 0.f);
  auto slot = [&](int64_t p) {
    return pool + (table[p / block_size] * block_size + p % block_size) * W;
  };
  const bf16* slots[KEY_CHUNK];
  const bf16* next[KEY_CHUNK];
  const bf16* keys[KEY_CHUNK];
  const bf16* values[KEY_CHUNK];
  for (int64_t p0 = lo; p0 < hi; p0 += KEY_CHUNK) {
    const int64_t n = std::min(KEY_CHUNK, hi - p0);
    const int64_t ahead = std::max<int64_t>(0, std::min(KEY_CHUNK, hi - p0 - KEY_CHUNK));
    for (int64_t j = 0; j < n; ++j) slots[j] = slot(p0 + j);
    for (int64_t j = 0; j < ahead; ++j) next[j] = slot(p0 + KEY_CHUNK + j);
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      // the next chunk's key and value of this kv head, a head at a time: a chunk's whole
      // range at once (128 KiB at 8 kv heads of 128) stalled on the fill buffers
      for (int64_t j = 0; j < ahead; ++j)
        for (int64_t i = 0; i < d; i += 32) {
          _mm_prefetch(reinterpret_cast<const char*>(next[j] + kh * d + i), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(next[j] + (kv_heads + kh) * d + i),
                       _MM_HINT_T1);
        }
      for (int64_t j = 0; j < n; ++j) {
        keys[j] = slots[j] + kh * d;
        values[j] = slots[j] + (kv_heads + kh) * d;
      }
      for (int64_t g0 = 0; g0 < G; g0 += HEADS_AT_ONCE) {
        const int64_t h = (kh - kh0) * G + g0;
        const bf16* qg = q + (first + h) * d;
        float* ag = acc.data() + h * d;
        switch (std::min(HEADS_AT_ONCE, G - g0)) {
          case 4: attend_chunk_pairs<4>(qg, d, scale, keys, values, n, ag, &m[h], &l[h]); break;
          case 3: attend_chunk_pairs<3>(qg, d, scale, keys, values, n, ag, &m[h], &l[h]); break;
          case 2: attend_chunk_pairs<2>(qg, d, scale, keys, values, n, ag, &m[h], &l[h]); break;
          default: attend_chunk_pairs<1>(qg, d, scale, keys, values, n, ag, &m[h], &l[h]);
        }
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d; ++i)
      out[(first + h) * d + i] =
          bf16(l[h] > 0.f || std::isnan(l[h]) ? acc[h * d + i] / l[h] : 0.f);
}
#endif

// The portable path, one (sequence, kv head): its G query heads read each cached key and
// value once, with an online softmax in fp32 over chunks of keys.
template <typename T>
void attend_one(const T* q, int64_t G, int64_t d, const T* pool, int64_t W,
                const int64_t* table, int64_t block_size, int64_t kv_heads, int64_t kh,
                int64_t lo, int64_t hi, float scale, T* out) {
  std::vector<float> qf(G * d), acc(G * d, 0.f), m(G, -INFINITY), l(G, 0.f);
  std::vector<float> s(G * KEY_CHUNK);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_float(q[g * d + i]) * scale;
  const T* rows[KEY_CHUNK];
  for (int64_t p0 = lo; p0 < hi; p0 += KEY_CHUNK) {
    const int64_t n = std::min(KEY_CHUNK, hi - p0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = p0 + j;
      rows[j] = pool + (table[p / block_size] * block_size + p % block_size) * W;
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s.data() + g * KEY_CHUNK;
      float top = m[g];
      for (int64_t j = 0; j < n; ++j) {
        sg[j] = dot(qf.data() + g * d, rows[j] + kh * d, d);
        top = std::max(top, sg[j]);
      }
      float* ag = acc.data() + g * d;
      if (top > m[g]) {  // rescale what is summed so far to the new maximum
        const float c = std::exp(m[g] - top);
        l[g] *= c;
        for (int64_t i = 0; i < d; ++i) ag[i] *= c;
        m[g] = top;
      }
      for (int64_t j = 0; j < n; ++j) {
        const float e = std::exp(sg[j] - top);
        l[g] += e;
        axpy(e, rows[j] + (kv_heads + kh) * d, d, ag);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < d; ++i)
      out[g * d + i] = T(l[g] > 0.f || std::isnan(l[g]) ? acc[g * d + i] / l[g] : 0.f);
}

// B sequences of H query heads of d against a pool of slots of W (K key then K value heads
// of d): the block table [B * n] and the lengths agree, and every block read is in the pool
void check_paged(int64_t B, int64_t H, int64_t d, const at::Tensor& pool,
                 const at::Tensor& blocks, at::IntArrayRef lengths, int64_t block_size,
                 int64_t kv_heads) {
  check_cpu(blocks, "blocks", 1);
  const int64_t W = pool.size(1);
  TORCH_CHECK(kv_heads > 0 && H % kv_heads == 0 && W == 2 * kv_heads * d && d > 0 &&
                  block_size > 0,
              "moeflow_cpu.paged_decode_attention: ", H, " query heads of ", d, ", ",
              kv_heads, " kv heads, slots of ", W, " and blocks of ", block_size,
              " do not agree");
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == B && B > 0 &&
                  blocks.numel() % B == 0 && blocks.scalar_type() == at::kLong,
              "moeflow_cpu.paged_decode_attention: ", lengths.size(), " lengths and ",
              blocks.numel(), " int64 block ids for ", B, " sequences");
  const int64_t n = blocks.numel() / B, slots = pool.size(0);
  const int64_t* table = blocks.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lengths[b] >= 1 && lengths[b] <= n * block_size,
                "moeflow_cpu.paged_decode_attention: sequence ", b, " sees ", lengths[b],
                " keys in ", n, " blocks of ", block_size);
    for (int64_t i = 0; i < (lengths[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(table[b * n + i] >= 0 && (table[b * n + i] + 1) * block_size <= slots,
                  "moeflow_cpu.paged_decode_attention: block ", table[b * n + i],
                  " is outside the pool");
  }
}

// q [B, H, d]; pool [S, W] of one layer, each slot K key heads then K value heads of d;
// blocks [B * n] block ids, each sequence's n; lengths [B] keys each sequence sees
// -> [B, H, d]
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& pool,
                                  const at::Tensor& blocks, at::IntArrayRef lengths,
                                  int64_t block_size, int64_t kv_heads,
                                  c10::optional<int64_t> window, double scale, int64_t isa) {
  check_cpu(q, "q", 3);
  check_cpu(pool, "pool", 2);
  check_dtype(q, pool, "pool");
  check_paged(q.size(0), q.size(1), q.size(2), pool, blocks, lengths, block_size, kv_heads);
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), W = pool.size(1);
  const int64_t n = blocks.numel() / B;
  const int64_t* table = blocks.data_ptr<int64_t>();
  isa = resolve(isa);
  at::Tensor out = at::empty({B, H, d}, q.options());
  const int64_t G = H / kv_heads;
  auto run = [&](auto* qp, auto* pp, auto* op) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(qp)>>;
#ifdef MOEFLOW_X86
    if (isa >= AVX2) {
      // a task: one sequence's kv heads, or a share of them where sequences are fewer
      // than threads (a chunk's slots are then read whole, by every head of the share)
      const int64_t threads = at::get_num_threads();
      const int64_t parts = std::min(kv_heads, std::max<int64_t>(1, (threads + B - 1) / B));
      // cut among threads by the keys each task reads (sequences of a batch differ in
      // length), plus a few for its fixed work
      auto cost = [&](int64_t i) {
        const int64_t b = i / parts, part = i % parts, len = lengths[b];
        const int64_t lo = window ? std::max<int64_t>(0, len - *window) : 0;
        const int64_t heads = kv_heads * (part + 1) / parts - kv_heads * part / parts;
        return static_cast<double>(heads) * static_cast<double>(len - lo + KEY_CHUNK);
      };
      parallel_by_cost(B * parts, 1, cost, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / parts, part = i % parts, len = lengths[b];
          const int64_t kh0 = kv_heads * part / parts, kh1 = kv_heads * (part + 1) / parts;
          const int64_t lo = window ? std::max<int64_t>(0, len - *window) : 0;
#ifdef MOEFLOW_BF16_PAIRS
          if constexpr (std::is_same<T, bf16>::value) {
            if (isa >= AVX512_BF16) {
              attend_seq_pairs(qp + b * H * d, G, d, pp, W, table + b * n, block_size,
                               kv_heads, kh0, kh1, lo, len, static_cast<float>(scale),
                               op + b * H * d);
              continue;
            }
          }
#endif
          attend_seq_avx2<T>(qp + b * H * d, G, d, pp, W, table + b * n, block_size,
                             kv_heads, kh0, kh1, lo, len, static_cast<float>(scale),
                             op + b * H * d);
        }
      });
      return;
    }
#endif
    auto cost = [&](int64_t i) {
      const int64_t len = lengths[i / kv_heads];
      const int64_t lo = window ? std::max<int64_t>(0, len - *window) : 0;
      return static_cast<double>(len - lo + KEY_CHUNK);
    };
    parallel_by_cost(B * kv_heads, 1, cost, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / kv_heads, kh = i % kv_heads, len = lengths[b];
        const int64_t lo = window ? std::max<int64_t>(0, len - *window) : 0;
        attend_one<T>(qp + (b * H + kh * G) * d, G, d, pp, W, table + b * n,
                      block_size, kv_heads, kh, lo, len, static_cast<float>(scale),
                      op + (b * H + kh * G) * d);
      }
    });
  };
  if (q.scalar_type() == at::kBFloat16)
    run(q.data_ptr<bf16>(), pool.data_ptr<bf16>(), out.data_ptr<bf16>());
  else
    run(q.data_ptr<float>(), pool.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// ---- causal prefill attention on bf16 pairs -----------------------------------------
//
// n new tokens at positions start .. start + n - 1 of one sequence, each seeing the keys up
// to its own position (a GQA layer: H query heads, K kv heads of d). A task is one kv head
// and a block of PREFILL_ROWS query rows: for each of its query heads, the scores of the
// rows against the keys the block's last row sees (packed panels of 16 keys, the rows as
// they sit in q), a softmax per row in fp32 (keys past a row's position masked), the
// exponentials rounded to bf16 (as torch's CPU flash attention rounds its probabilities for
// the second GEMM), and their product with V (panels over V transposed once per kv head),
// divided by each row's sum. torch's causal SDPA ran ~60 GFLOP/s here: it computes every
// block of the causal square and widens the GEMMs' inputs to fp32.
constexpr int64_t PREFILL_ROWS = 64;

#ifdef MOEFLOW_BF16_PAIRS
BF16_FN void prefill_block(const bf16* q, const bf16* k, const bf16* vt, int64_t H, int64_t K,
                           int64_t d, int64_t L, int64_t Lpad, int64_t start, int64_t r0,
                           int64_t r1, int64_t kh, float scale, bf16* out) {
  const int64_t G = H / K, rows = r1 - r0, M = G * rows;
  const int64_t seen = std::min(L, start + r1);  // the keys the block's last row sees
  const int64_t seen_pad = (seen + 1) / 2 * 2;
  // the kv head's G query heads stacked, head by head ([G * rows, d]): one panel of 16
  // keys (or of 16 output columns) packed once for all of them
  std::vector<bf16> qs(M * d);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < rows; ++r)
      std::copy(q + ((r0 + r) * H + kh * G + g) * d, q + ((r0 + r) * H + kh * G + g + 1) * d,
                qs.data() + (g * rows + r) * d);
  std::vector<float> sums(M * PB), pack(KC * PB), total(M);
  // written before they are read: left uninitialized (a fill of them took a tenth)
  std::unique_ptr<float[]> scores(new float[M * seen]);
  std::unique_ptr<bf16[]> probs(new bf16[M * seen_pad]);
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < seen; j0 += PB) {
    const int nr = static_cast<int>(std::min<int64_t>(PB, seen - j0));
    panel(AVX512_BF16, qs.data(), d, M, k + (j0 * K + kh) * d, K * d, nr, d, sums.data(),
          pack.data());
    const __mmask16 mask = static_cast<__mmask16>((1u << nr) - 1);
    for (int64_t i = 0; i < M; ++i)
      _mm512_mask_storeu_ps(scores.get() + i * seen + j0, mask,
                            _mm512_mul_ps(_mm512_loadu_ps(sums.data() + i * PB), scale16));
  }
  for (int64_t i = 0; i < M; ++i) {
    const int64_t visible = std::min(seen, start + r0 + i % rows + 1);
    const float* sr = scores.get() + i * seen;
    bf16* pr = probs.get() + i * seen_pad;
    __m512 top16 = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < visible; j += 16) {  // a NaN is dropped, as std::max drops it
      const __mmask16 m = visible - j >= 16 ? __mmask16(0xFFFF)
                                            : static_cast<__mmask16>((1u << (visible - j)) - 1);
      top16 = _mm512_mask_max_ps(top16, m, _mm512_maskz_loadu_ps(m, sr + j), top16);
    }
    const float top = _mm512_reduce_max_ps(top16);
    __m256 sum8 = _mm256_setzero_ps();
    float sum = 0.f;
    int64_t j = 0;
    const __m256 topv = _mm256_set1_ps(top);
    for (; j + 8 <= visible; j += 8) {
      const __m256 e = round8<bf16>(exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), topv)));
      sum8 = _mm256_add_ps(sum8, e);
      store8(pr + j, e);
    }
    for (; j < visible; ++j) {
      pr[j] = bf16(std::exp(sr[j] - top));
      sum += static_cast<float>(pr[j]);
    }
    for (; j < seen_pad; ++j) pr[j] = bf16(0.f);
    total[i] = sum + hsum(sum8);
  }
  for (int64_t c0 = 0; c0 < d; c0 += PB) {
    const int nr = static_cast<int>(std::min<int64_t>(PB, d - c0));
    panel(AVX512_BF16, probs.get(), seen_pad, M, vt + (kh * d + c0) * Lpad, Lpad, nr,
          seen_pad, sums.data(), pack.data());
    for (int64_t i = 0; i < M; ++i) {
      const int64_t g = i / rows, r = i % rows;
      const float inv = total[i] > 0.f || std::isnan(total[i]) ? 1.f / total[i] : 0.f;
      bf16* o = out + ((r0 + r) * H + kh * G + g) * d + c0;
      for (int j = 0; j < nr; ++j) o[j] = bf16(sums[i * PB + j] * inv);
    }
  }
}
#endif

// q [n, H, d], k and v [L, K, d] (L = start + n: the sequence's keys so far and the new
// ones), bf16 -> [n, H, d]; on the pairs path only (isa >= AVX512_BF16)
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             int64_t start, double scale, int64_t isa) {
  check_cpu(q, "q", 3);
  check_cpu(k, "k", 3);
  check_cpu(v, "v", 3);
  const int64_t n = q.size(0), H = q.size(1), d = q.size(2), L = k.size(0), K = k.size(1);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "moeflow_cpu.prefill_attention: takes bfloat16");
  TORCH_CHECK(K > 0 && H % K == 0 && k.size(2) == d && v.sizes() == k.sizes() && d > 0 &&
                  start >= 0 && L == start + n,
              "moeflow_cpu.prefill_attention: q [", n, ", ", H, ", ", d, "], k [", L, ", ", K,
              ", ", k.size(2), "], v ", v.sizes(), " and start ", start, " do not agree");
  isa = resolve(isa);
  TORCH_CHECK(isa >= AVX512_BF16, "moeflow_cpu.prefill_attention: needs AVX-512 BF16");
  at::Tensor out = at::empty({n, H, d}, q.options());
  if (n == 0) return out;
#ifdef MOEFLOW_BF16_PAIRS
  const int64_t Lpad = (L + 1) / 2 * 2;
  std::vector<bf16> vt(K * d * Lpad, bf16(0.f));  // [K, d, Lpad]: V transposed per kv head
  const bf16* vp = v.data_ptr<bf16>();
  at::parallel_for(0, K * d, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)  // i = kh * d + c
      for (int64_t j = 0; j < L; ++j) vt[i * Lpad + j] = vp[(j * K + i / d) * d + i % d];
  });
  const int64_t blocks = (n + PREFILL_ROWS - 1) / PREFILL_ROWS;
  const bf16* qp = q.data_ptr<bf16>();
  const bf16* kp = k.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  // a block's cost is its rows times the keys they see: the threads take runs of blocks of
  // equal cost (cut by count, the first thread took the later half, 72 % of a 512-token
  // prompt's work, and the other waited)
  auto block_rows = [&](int64_t b) {
    return std::min(n, (b + 1) * PREFILL_ROWS) - b * PREFILL_ROWS;
  };
  auto cost = [&](int64_t t) {
    const int64_t b = blocks - 1 - t / K;
    return static_cast<double>(block_rows(b)) *
           static_cast<double>(std::min(L, start + b * PREFILL_ROWS + block_rows(b)));
  };
  parallel_by_cost(blocks * K, 1, cost, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = blocks - 1 - t / K, kh = t % K;
      prefill_block(qp, kp, vt.data(), H, K, d, L, Lpad, start, b * PREFILL_ROWS,
                    std::min(n, (b + 1) * PREFILL_ROWS), kh, static_cast<float>(scale), op);
    }
  });
#endif
  return out;
}

// ---- RMSNorm ---------------------------------------------------------------------

#ifdef MOEFLOW_X86
// 8 consecutive elements as fp32
AVX2_FN inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }

AVX2_FN inline __m256 widen8(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

template <typename T>
AVX2_FN void norm_row_avx2(const T* x, const T* w, int64_t D, double eps, T* y) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = widen8(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (int64_t j = i; j < D; ++j) ss += to_float(x[j]) * to_float(x[j]);
  const float scale = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  const __m256 sv = _mm256_set1_ps(scale);
  for (i = 0; i + 8 <= D; i += 8)
    store8(y + i, _mm256_mul_ps(widen8(w + i), round8<T>(_mm256_mul_ps(widen8(x + i), sv))));
  for (; i < D; ++i) y[i] = T(to_float(w[i]) * round_to<T>(to_float(x[i]) * scale));
}

// y[i] = T(a[i] + b[i]) (y may be a)
template <typename T>
AVX2_FN void add_row_avx2(const T* a, const T* b, int64_t n, T* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, _mm256_add_ps(widen8(a + i), widen8(b + i)));
  for (; i < n; ++i) y[i] = T(to_float(a[i]) + to_float(b[i]));
}

// one head rotated in place, d / 2 a multiple of 8: x[i] c[i] + x[i +- d/2] s[i], each
// product rounded to bf16, as torch's q * cos + rotate_half(q) * sin stores them (bf16
// only: in fp32 nothing between the products and their sum would keep the compiler from
// fusing them, and torch rounds each)
AVX2_FN void rotate_head_avx2(bf16* head, const bf16* c, const bf16* s, int64_t d) {
  using T = bf16;
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 lo = widen8(head + i), hi = widen8(head + half + i);
    const __m256 out_lo = _mm256_add_ps(round8<T>(_mm256_mul_ps(lo, widen8(c + i))),
                                        round8<T>(_mm256_mul_ps(hi, widen8(s + i))));
    const __m256 out_hi = _mm256_add_ps(round8<T>(_mm256_mul_ps(hi, widen8(c + half + i))),
                                        round8<T>(_mm256_mul_ps(lo, widen8(s + half + i))));
    store8(head + i, out_lo);
    store8(head + half + i, out_hi);
  }
}
#endif

// The rows of a decode step's norms, rotations and residuals are a few thousand elements
// each, bf16 rounded one by one: on 8 lanes where the CPU has AVX2 (whatever isa a kernel
// was asked for, so that the unfused ops and the fused ones agree bit for bit): a 16-row
// attention_decode (hidden 1024, 16 + 2 x 4 heads of 64) spent ~180 us outside its GEMMs
// and attention one element at a time, ~95 so. combine's loops likewise.

// Whether the row-wise pieces take 8 lanes: the CPU's features, not a call's isa
inline bool row_lanes() {
  static const bool avx2 = best_isa() >= AVX2;
  return avx2;
}

// One row: y = w * T(x * rsqrt(mean(x^2) + eps)), the product rounded to T (y may be x)
template <typename T>
void norm_row(const T* x, const T* w, int64_t D, double eps, T* y) {
#ifdef MOEFLOW_X86
  if (row_lanes()) return norm_row_avx2(x, w, D, eps, y);
#endif
  float ss = 0.f;
  for (int64_t i = 0; i < D; ++i) ss += to_float(x[i]) * to_float(x[i]);
  const float scale = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  for (int64_t i = 0; i < D; ++i) y[i] = T(to_float(w[i]) * round_to<T>(to_float(x[i]) * scale));
}

// y[i] = T(a[i] + b[i])
template <typename T>
void add_row(const T* a, const T* b, int64_t n, T* y) {
#ifdef MOEFLOW_X86
  if (row_lanes()) return add_row_avx2(a, b, n, y);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = T(to_float(a[i]) + to_float(b[i]));
}

// one head rotated in place: x[i] c[i] + x[(i + d/2) % d] s[i] (s carries rotate_half's
// sign), each product rounded to T; `x` a scratch row of d floats
template <typename T>
void rotate_head(T* head, const T* c, const T* s, int64_t d, float* x) {
#ifdef MOEFLOW_X86
  if constexpr (std::is_same<T, bf16>::value) {
    if (row_lanes() && d % 16 == 0) return rotate_head_avx2(head, c, s, d);
  }
#endif
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) x[i] = to_float(head[i]);
  for (int64_t i = 0; i < d; ++i)
    head[i] = T(round_to<T>(x[i] * to_float(c[i])) + round_to<T>(x[(i + half) % d] *
                                                                 to_float(s[i])));
}

// x [R, D] -> w * T(x * rsqrt(mean(x^2) + eps)), the product rounded to T: the families'
// formulation (moeflow/ops/norm.py), in one pass over each row instead of four ops. w is
// [D], or [G, D] for rows that cycle through G weights (per-head norms: x [T, G, D] seen as
// [T * G, D], row r scaled by w[r % G]).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu(x, "x", 2);
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && (w.dim() == 1 || w.dim() == 2),
              "moeflow_cpu.rms_norm: w must be a contiguous [D] or [G, D] CPU tensor");
  check_dtype(x, w, "w");
  const int64_t R = x.size(0), D = x.size(1);
  const int64_t G = w.dim() == 2 ? w.size(0) : 1;
  TORCH_CHECK(w.size(-1) == D && D > 0 && G > 0, "moeflow_cpu.rms_norm: x [", R, ", ", D,
              "], w ", w.sizes());
  at::Tensor y = at::empty_like(x);
  auto run = [&](auto* xp, auto* wp, auto* yp) {
    at::parallel_for(0, R, std::max<int64_t>(1, (64 << 10) / (D * 4)), [&](int64_t r0,
                                                                          int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * D, wp + (r % G) * D, D, eps, yp + r * D);
    });
  };
  if (x.scalar_type() == at::kBFloat16)
    run(x.data_ptr<bf16>(), w.data_ptr<bf16>(), y.data_ptr<bf16>());
  else
    run(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

// ---- a decode step of a GQA attention layer, in one call ------------------------------
//
// At decode, around its three GEMM-sized steps (the QKV and output projections and the
// paged attention), a layer's attention is some 40 torch ops over one row per sequence:
// norms, the QKV split, q/k norms, the rotation, the cache write, the residual. Each costs a
// few microseconds of dispatch for nanoseconds of work (~0.5 ms a layer on a 2-core
// machine). Here they are one call, rounding where torch's ops store, so the result is
// bit-exact with the unfused path (the worker's, and the test's).

// hidden [T, D]: T sequences, one new token each -> {resid [T, D], xn [T, D]}:
//   x = rms_norm(hidden, input_norm); qkv = x . qkv_w^T (+ qkv_b): [T, (H + 2K) d];
//   q and k normed per head (q_norm, k_norm [d]) or over their whole width ([H d], [K d]),
//   or not at all (neither given);
//   q and k rotated: T(T(x * cos) + T(roll(x, d/2) * sin)), cos and signed sin [T, d];
//   k and v written to pool [S, 2 K d] at slots [T] (int64);
//   attention over each sequence's cache (paged_decode_attention's blocks and lengths);
//   resid = T(hidden + attn . o_w^T (+ o_b)); xn = rms_norm(resid, post_norm)
std::vector<at::Tensor> attention_decode(
    const at::Tensor& hidden, const at::Tensor& input_norm, const at::Tensor& qkv_w,
    const c10::optional<at::Tensor>& qkv_b, const c10::optional<at::Tensor>& q_norm,
    const c10::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& pool, const at::Tensor& slots, const at::Tensor& blocks,
    at::IntArrayRef lengths, int64_t block_size, int64_t heads, int64_t kv_heads,
    c10::optional<int64_t> window, double scale, const at::Tensor& o_w,
    const c10::optional<at::Tensor>& o_b, const at::Tensor& post_norm, double eps,
    int64_t isa) {
  check_cpu(hidden, "hidden", 2);
  check_cpu(cos, "cos", 2);
  check_cpu(sin, "sin", 2);
  check_cpu(slots, "slots", 1);
  check_cpu(pool, "pool", 2);
  check_cpu(qkv_w, "qkv_w", 2);
  check_cpu(o_w, "o_w", 2);
  for (const at::Tensor* t : {&input_norm, &post_norm, &cos, &sin, &pool, &qkv_w, &o_w})
    check_dtype(hidden, *t, "a weight, table or the cache");
  const int64_t T = hidden.size(0), D = hidden.size(1);
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 &&
                  qkv_w.size(0) % (heads + 2 * kv_heads) == 0,
              "moeflow_cpu.attention_decode: ", heads, " query heads and ", kv_heads,
              " kv heads for a QKV projection of ", qkv_w.size(0));
  const int64_t d = qkv_w.size(0) / (heads + 2 * kv_heads), width = qkv_w.size(0);
  TORCH_CHECK(d > 0 && d % 2 == 0 && qkv_w.size(1) == D && o_w.size(0) == D &&
                  o_w.size(1) == heads * d && input_norm.numel() == D &&
                  post_norm.numel() == D,
              "moeflow_cpu.attention_decode: hidden [", T, ", ", D, "], qkv_w ",
              qkv_w.sizes(), ", o_w ", o_w.sizes(), " and norms of ", input_norm.numel(),
              " and ", post_norm.numel(), " do not agree");
  TORCH_CHECK(cos.size(0) == T && cos.size(1) == d && sin.sizes() == cos.sizes(),
              "moeflow_cpu.attention_decode: rotation tables ", cos.sizes(), " and ",
              sin.sizes(), " for ", T, " rows of heads of ", d);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.size(0) == T &&
                  pool.size(1) == 2 * kv_heads * d,
              "moeflow_cpu.attention_decode: ", slots.size(0), " slots for ", T,
              " rows, cache slots of ", pool.size(1));
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < pool.size(0), "moeflow_cpu.attention_decode: slot ",
                slot[t], " is outside the cache");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(),
              "moeflow_cpu.attention_decode: q_norm and k_norm come together");
  if (q_norm) {
    check_dtype(hidden, *q_norm, "q_norm");
    check_dtype(hidden, *k_norm, "k_norm");
    TORCH_CHECK(q_norm->device().is_cpu() && k_norm->device().is_cpu() &&
                    q_norm->is_contiguous() && k_norm->is_contiguous() &&
                    (q_norm->numel() == d || q_norm->numel() == heads * d) &&
                    (k_norm->numel() == d || k_norm->numel() == kv_heads * d),
                "moeflow_cpu.attention_decode: q_norm of ", q_norm->numel(), " and k_norm of ",
                k_norm->numel(), " for heads of ", d);
  }
  if (o_b) check_dtype(hidden, *o_b, "o_b");
  if (o_b)
    TORCH_CHECK(o_b->device().is_cpu() && o_b->dim() == 1 && o_b->size(0) == D,
                "moeflow_cpu.attention_decode: o_b must be a CPU [", D, "]");
  if (T == 0) return {at::empty_like(hidden), at::empty_like(hidden)};
  // the cache is written below: everything the attention reads is checked first
  check_paged(T, heads, d, pool, blocks, lengths, block_size, kv_heads);
  isa = resolve(isa);
  at::Tensor qkv = linear(rms_norm(hidden, input_norm, eps), qkv_w, qkv_b, isa);
  at::Tensor q = at::empty({T, heads, d}, hidden.options());
  auto prepare = [&](auto* qkvp) {
    using V = std::remove_pointer_t<decltype(qkvp)>;
    const V* cp = cos.data_ptr<V>();
    const V* sp = sin.data_ptr<V>();
    const V* qn = q_norm ? q_norm->data_ptr<V>() : nullptr;
    const V* kn = k_norm ? k_norm->data_ptr<V>() : nullptr;
    V* qp = q.data_ptr<V>();
    V* pp = pool.data_ptr<V>();
    const int64_t qk = heads + kv_heads;
    std::vector<float> x(d);
    for (int64_t t = 0; t < T; ++t) {
      V* row = qkvp + t * width;  // H q heads, K k heads, K v heads
      if (qn) {
        const int64_t qstep = q_norm->numel() == d ? d : heads * d;
        for (int64_t i = 0; i < heads * d; i += qstep) norm_row(row + i, qn, qstep, eps, row + i);
        const int64_t kstep = k_norm->numel() == d ? d : kv_heads * d;
        for (int64_t i = 0; i < kv_heads * d; i += kstep)
          norm_row(row + heads * d + i, kn, kstep, eps, row + heads * d + i);
      }
      const V* c = cp + t * d;
      const V* s = sp + t * d;
      for (int64_t h = 0; h < qk; ++h) rotate_head(row + h * d, c, s, d, x.data());
      std::copy(row, row + heads * d, qp + t * heads * d);
      std::copy(row + heads * d, row + width, pp + slot[t] * 2 * kv_heads * d);
    }
  };
  if (hidden.scalar_type() == at::kBFloat16)
    prepare(qkv.data_ptr<bf16>());
  else
    prepare(qkv.data_ptr<float>());
  at::Tensor attn = paged_decode_attention(q, pool, blocks, lengths, block_size, kv_heads,
                                           window, scale, isa);
  at::Tensor o = linear(attn.view({T, heads * d}), o_w, o_b, isa);
  at::Tensor resid = at::empty_like(hidden);
  auto add = [&](auto* hp) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(hp)>>;
    add_row(hp, o.data_ptr<V>(), T * D, resid.data_ptr<V>());
  };
  if (hidden.scalar_type() == at::kBFloat16)
    add(hidden.data_ptr<bf16>());
  else
    add(hidden.data_ptr<float>());
  return {resid, rms_norm(resid, post_norm, eps)};
}

// ---- routing bookkeeping ---------------------------------------------------------------
//
// At decode these are a few hundred integers or rows, and torch's ops for them (argsort,
// bincount, cumsum and a division; zeros, index_add_ and an add) cost 15-95 us each on a
// 2-core machine, for microseconds of work: a node's worth in one call each.

// rank [N] (int64, each in [0, bins)) -> a stable counting sort: order [N] (position ->
// row), token [N] (order / top_k), counts [bins] (int64) and ends [bins] (int32: the
// running sum of counts, restarting every `period` bins: each item's experts)
std::vector<at::Tensor> dispatch_order(const at::Tensor& rank, int64_t bins, int64_t period,
                                       int64_t top_k) {
  check_cpu(rank, "rank", 1);
  TORCH_CHECK(rank.scalar_type() == at::kLong, "moeflow_cpu.dispatch_order: rank must be int64");
  TORCH_CHECK(bins > 0 && period > 0 && bins % period == 0 && top_k > 0,
              "moeflow_cpu.dispatch_order: bins ", bins, ", period ", period, ", top_k ", top_k);
  const int64_t N = rank.size(0);
  const int64_t* r = rank.data_ptr<int64_t>();
  at::Tensor counts = at::zeros({bins}, rank.options());
  at::Tensor ends = at::empty({bins}, rank.options().dtype(at::kInt));
  at::Tensor order = at::empty({N}, rank.options());
  at::Tensor token = at::empty({N}, rank.options());
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < bins, "moeflow_cpu.dispatch_order: rank ", r[i],
                " is out of [0, ", bins, ")");
    ++c[r[i]];
  }
  std::vector<int64_t> next(bins);
  int32_t* e = ends.data_ptr<int32_t>();
  int64_t start = 0, running = 0;
  for (int64_t b = 0; b < bins; ++b) {
    if (b % period == 0) running = 0;
    next[b] = start;
    start += c[b];
    running += c[b];
    e[b] = static_cast<int32_t>(running);
  }
  int64_t* o = order.data_ptr<int64_t>();
  int64_t* t = token.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t pos = next[r[i]]++;
    o[pos] = i;
    t[pos] = i / top_k;
  }
  return {order, token, counts, ends};
}

// x ranks above y: the larger, NaN above any number (as torch.topk ranks them)
inline bool ranks_above(float x, float y) {
  return (std::isnan(x) && !std::isnan(y)) || x > y;
}

// The k of values[E] that rank highest, best first, the lower index first among equals ->
// their indices and values (k <= E). An insertion into k sorted slots: E is a router's
// experts (8-256) and k its top-k (1-8).
void top_k_of(const float* values, int64_t E, int64_t k, int64_t* ids, float* top) {
  int64_t held = 0;
  for (int64_t i = 0; i < E; ++i) {
    const float v = values[i];
    if (held == k && !ranks_above(v, top[k - 1])) continue;
    int64_t pos = held < k ? held++ : k - 1;
    for (; pos > 0 && ranks_above(v, top[pos - 1]); --pos) {
      top[pos] = top[pos - 1];
      ids[pos] = ids[pos - 1];
    }
    top[pos] = v;
    ids[pos] = i;
  }
}

// One token's routing, from its logits[E] in fp32 (see route_dispatch) -> ids[k], w[k].
// scratch: E floats.
void route_row(int64_t mode, const float* logits, int64_t E, int64_t k, bool norm,
               float norm_eps, float scaling, float* scratch, int64_t* ids, float* w) {
  if (mode == 1) {  // topk_softmax: the k best logits, a softmax over them
    top_k_of(logits, E, k, ids, w);
    const float top = w[0];
    float total = 0.f;
    for (int64_t a = 0; a < k; ++a) total += w[a] = std::exp(w[a] - top);
    for (int64_t a = 0; a < k; ++a) w[a] /= total;
    return;
  }
  float top = logits[0];  // softmax_topk: a softmax over every expert, its k best
  for (int64_t e = 1; e < E; ++e) top = std::max(top, logits[e]);
  float total = 0.f;
  for (int64_t e = 0; e < E; ++e) total += scratch[e] = std::exp(logits[e] - top);
  for (int64_t e = 0; e < E; ++e) scratch[e] /= total;
  top_k_of(scratch, E, k, ids, w);
  if (norm && k > 1) {
    float kept = 0.f;
    for (int64_t a = 0; a < k; ++a) kept += w[a];
    if (norm_eps != 0.f) kept += norm_eps;
    for (int64_t a = 0; a < k; ++a) w[a] /= kept;
  } else if (scaling != 1.f) {
    for (int64_t a = 0; a < k; ++a) w[a] *= scaling;
  }
}

// A gate's routing at decode, in one call: router logits [T, E] of the rows of several
// items (units; sizes [items] rows each) -> the top_k experts of each row and their
// weights, then the rows in dispatch order. The routing is moeflow/ops/router.py's, done
// here without torch's ops: each of them cost 10-30 us at decode, its code cold after the
// experts' weights streamed through the caches, for a few hundred floats of work. The
// weights are within a few fp32 ulps of router.py's (exp, and the order of the sums); among
// equal scores the lower expert ranks first (torch.topk leaves that order open). The
// dispatch is `dispatch_order`'s counting sort.
//   mode 0, softmax_topk: softmax over all experts, the top k, then renormalised (norm,
//     with norm_eps added to the sum unless 0) or else scaled by `scaling`;
//   mode 1, topk_softmax: the top k logits, softmax over them.
// rank [E] (int64): each expert's place in the dispatch order (None: the identity).
// -> {token [N] (each routed row's token, from its item's first row), weight [N] (fp32),
//     counts [items * E] (int64, by item then rank), ends [items * E] (int32, running
//     within each item)}, N = T * top_k, rows sorted by (item, rank) and stable.
std::vector<at::Tensor> route_dispatch(const at::Tensor& logits, int64_t mode, int64_t top_k,
                                       bool norm, double norm_eps, double scaling,
                                       const c10::optional<at::Tensor>& rank,
                                       at::IntArrayRef sizes,
                                       const c10::optional<at::Tensor>& x) {
  check_cpu(logits, "logits", 2);
  if (x) {
    check_cpu(*x, "x", 2);
    TORCH_CHECK(x->size(0) == logits.size(0), "moeflow_cpu.route_dispatch: x has ",
                x->size(0), " rows for ", logits.size(0), " rows of logits");
  }
  const int64_t T = logits.size(0), E = logits.size(1), items = sizes.size();
  TORCH_CHECK(mode == 0 || mode == 1, "moeflow_cpu.route_dispatch: mode ", mode,
              " is not 0 (softmax_topk) or 1 (topk_softmax)");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moeflow_cpu.route_dispatch: top ", top_k, " of ", E,
              " experts");
  int64_t total_rows = 0;
  for (int64_t n : sizes) {
    TORCH_CHECK(n >= 0, "moeflow_cpu.route_dispatch: an item of ", n, " rows");
    total_rows += n;
  }
  TORCH_CHECK(items > 0 && total_rows == T, "moeflow_cpu.route_dispatch: items of ", sizes,
              " rows for ", T, " rows of logits");
  if (rank) {
    check_cpu(*rank, "rank", 1);
    TORCH_CHECK(rank->scalar_type() == at::kLong && rank->size(0) == E,
                "moeflow_cpu.route_dispatch: rank must be int64 [", E, "]");
    const int64_t* r = rank->data_ptr<int64_t>();
    std::vector<bool> seen(E, false);
    for (int64_t e = 0; e < E; ++e) {
      TORCH_CHECK(r[e] >= 0 && r[e] < E && !seen[r[e]],
                  "moeflow_cpu.route_dispatch: rank is not a permutation of the experts");
      seen[r[e]] = true;
    }
  }
  const int64_t N = T * top_k, bins = items * E;
  std::vector<int64_t> id(N);
  std::vector<float> w(N), row(E), scratch(E);
  const at::Tensor scores = logits.scalar_type() == at::kFloat ||
                                    logits.scalar_type() == at::kBFloat16
                                ? logits
                                : logits.to(at::kFloat);
  for (int64_t t = 0; t < T; ++t) {
    if (scores.scalar_type() == at::kBFloat16) {
      const bf16* l = scores.data_ptr<bf16>() + t * E;
      for (int64_t e = 0; e < E; ++e) row[e] = static_cast<float>(l[e]);
    } else {
      std::copy_n(scores.data_ptr<float>() + t * E, E, row.data());
    }
    route_row(mode, row.data(), E, top_k, norm, static_cast<float>(norm_eps),
              static_cast<float>(scaling), scratch.data(), id.data() + t * top_k,
              w.data() + t * top_k);
  }
  const int64_t* r = rank ? rank->data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> bin(N), first(T);
  for (int64_t i = 0, t = 0; i < items; ++i)
    for (int64_t j = 0; j < sizes[i]; ++j, ++t) {
      first[t] = t - j;
      for (int64_t a = 0; a < top_k; ++a)
        bin[t * top_k + a] = i * E + (r ? r[id[t * top_k + a]] : id[t * top_k + a]);
    }
  const auto index = logits.options().dtype(at::kLong);
  at::Tensor counts = at::empty({bins}, index);
  at::Tensor ends = at::empty({bins}, index.dtype(at::kInt));
  at::Tensor token = at::empty({N}, index);
  at::Tensor weight = at::empty({N}, index.dtype(at::kFloat));
  int64_t* c = counts.data_ptr<int64_t>();
  std::fill_n(c, bins, 0);
  for (int64_t n = 0; n < N; ++n) ++c[bin[n]];
  std::vector<int64_t> next(bins);
  int32_t* e = ends.data_ptr<int32_t>();
  for (int64_t b = 0, start = 0, running = 0; b < bins; ++b) {
    if (b % E == 0) running = 0;
    next[b] = start;
    start += c[b];
    running += c[b];
    e[b] = static_cast<int32_t>(running);
  }
  int64_t* tok = token.data_ptr<int64_t>();
  float* wt = weight.data_ptr<float>();
  std::vector<int64_t> row_of(x ? N : 0);  // position -> the row of x it routes
  for (int64_t n = 0; n < N; ++n) {
    const int64_t pos = next[bin[n]]++;
    tok[pos] = n / top_k - first[n / top_k];
    wt[pos] = w[n];
    if (x) row_of[pos] = n / top_k;
  }
  if (!x) return {token, weight, counts, ends};
  // the routed rows themselves, in dispatch order: each dispatch is then a slice of them
  const int64_t D = x->size(1), bytes = D * x->element_size();
  at::Tensor rows = at::empty({N, D}, x->options());
  const char* src = static_cast<const char*>(x->data_ptr());
  char* dst = static_cast<char*>(rows.data_ptr());
  for (int64_t pos = 0; pos < N; ++pos)
    std::memcpy(dst + pos * bytes, src + row_of[pos] * bytes, bytes);
  return {token, weight, counts, ends, rows};
}

#ifdef MOEFLOW_X86
// combine's loops on 8 lanes: the same sums in the same order, so the same bits (adds only:
// nothing for the compiler to fuse)
template <typename V>
AVX2_FN void combine_avx2(const V* rp, const V* src, const int64_t* tok, int64_t N,
                          const std::vector<const V*>& extras, int64_t n, int64_t D,
                          float* out, V* yp) {
  for (int64_t i = 0; i < N; ++i) {
    float* o = out + tok[i] * D;
    const V* s = src + i * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_loadu_ps(o + d), widen8(s + d)));
    for (; d < D; ++d) o[d] += to_float(s[d]);
  }
  int64_t k = 0;
  if (N) {
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(out + k, round8<V>(_mm256_loadu_ps(out + k)));
    for (; k < n; ++k) out[k] = round_to<V>(out[k]);
  }
  for (const V* s : extras) {
    for (k = 0; k + 8 <= n; k += 8)
      _mm256_storeu_ps(out + k, round8<V>(_mm256_add_ps(_mm256_loadu_ps(out + k), widen8(s + k))));
    for (; k < n; ++k) out[k] = round_to<V>(out[k] + to_float(s[k]));
  }
  for (k = 0; k + 8 <= n; k += 8)
    store8(yp + k, _mm256_add_ps(widen8(rp + k), _mm256_loadu_ps(out + k)));
  for (; k < n; ++k) yp[k] = V(to_float(rp[k]) + out[k]);
}
#endif

// resid [T, D] + (rows [N, D] added at their tokens [N], one after another, then each of
// extras [T, D]), rounded to the model dtype where torch's ops store: zeros, index_add_
// (its sums in fp32), += and + in the families' order
at::Tensor combine(const at::Tensor& resid, const at::Tensor& rows, const at::Tensor& token,
                   at::TensorList extras) {
  check_cpu(resid, "resid", 2);
  check_cpu(rows, "rows", 2);
  check_cpu(token, "token", 1);
  TORCH_CHECK(resid.scalar_type() == at::kBFloat16 || resid.scalar_type() == at::kFloat,
              "moeflow_cpu.combine: takes bfloat16 or float32, got ", resid.scalar_type());
  TORCH_CHECK(rows.scalar_type() == resid.scalar_type() && token.scalar_type() == at::kLong,
              "moeflow_cpu.combine: rows must be ", resid.scalar_type(), " and token int64");
  const int64_t T = resid.size(0), D = resid.size(1), N = rows.size(0);
  TORCH_CHECK(token.size(0) == N && (N == 0 || rows.size(1) == D),
              "moeflow_cpu.combine: resid [", T, ", ", D, "], rows ", rows.sizes(), ", token [",
              token.size(0), "]");
  for (const at::Tensor& x : extras) {
    check_cpu(x, "an extra", 2);
    TORCH_CHECK(x.scalar_type() == resid.scalar_type() && x.size(0) == T && x.size(1) == D,
                "moeflow_cpu.combine: an extra is ", x.sizes(), ", resid [", T, ", ", D, "]");
  }
  const int64_t* tok = token.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(tok[i] >= 0 && tok[i] < T, "moeflow_cpu.combine: token ", tok[i],
                " is out of [0, ", T, ")");
  at::Tensor y = at::empty_like(resid);
  auto run = [&](auto* rp, auto* yp) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(rp)>>;
    std::vector<float> out(T * D, 0.f);
    const V* src = N ? rows.data_ptr<V>() : nullptr;
    std::vector<const V*> more;
    for (const at::Tensor& x : extras) more.push_back(x.data_ptr<V>());
#ifdef MOEFLOW_X86
    if (row_lanes()) return combine_avx2(rp, src, tok, N, more, T * D, D, out.data(), yp);
#endif
    for (int64_t i = 0; i < N; ++i) {
      float* o = out.data() + tok[i] * D;
      const V* s = src + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] += to_float(s[d]);
    }
    if (N)  // index_add_ sums a reduced-precision tensor's rows in fp32, and stores once
      for (int64_t k = 0; k < T * D; ++k) out[k] = round_to<V>(out[k]);
    for (const V* s : more)
      for (int64_t k = 0; k < T * D; ++k) out[k] = round_to<V>(out[k] + to_float(s[k]));
    for (int64_t k = 0; k < T * D; ++k) yp[k] = V(to_float(rp[k]) + out[k]);
  };
  if (resid.scalar_type() == at::kBFloat16)
    run(resid.data_ptr<bf16>(), y.data_ptr<bf16>());
  else
    run(resid.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

}  // namespace

}  // namespace moeflow_cpu

// A Python module of its own rather than torch ops: a call through torch.ops goes through
// the dispatcher's boxing, 1.5-2.5 us more a call than pybind11 here, and 6-10 us more when
// its code is cold, as it is at decode between the experts' weights (every kernel of a
// decode step is such a call). Each call releases the GIL, as torch's ops do.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace moeflow_cpu;
  using py::arg;
  const auto free = py::call_guard<py::gil_scoped_release>();
  m.def("best_isa", &best_isa);
  m.def("panel_rows", &panel_rows);
  m.def("set_panel_rows", &set_panel_rows, arg("rows"));
  m.def("linear", &linear, arg("x"), arg("w"), arg("bias"), arg("isa"), free);
  m.def("expert_ffn", &expert_ffn, arg("x"), arg("order"), arg("counts"), arg("gate_up"),
        arg("down"), arg("scale"), arg("isa"), free);
  m.def("paged_decode_attention", &paged_decode_attention, arg("q"), arg("pool"),
        arg("blocks"), arg("lengths"), arg("block_size"), arg("kv_heads"), arg("window"),
        arg("scale"), arg("isa"), free);
  m.def("prefill_attention", &prefill_attention, arg("q"), arg("k"), arg("v"), arg("start"),
        arg("scale"), arg("isa"), free);
  m.def("rms_norm", &rms_norm, arg("x"), arg("w"), arg("eps"), free);
  m.def("attention_decode", &attention_decode, arg("hidden"), arg("input_norm"),
        arg("qkv_w"), arg("qkv_b"), arg("q_norm"), arg("k_norm"), arg("cos"), arg("sin"),
        arg("pool"), arg("slots"), arg("blocks"), arg("lengths"), arg("block_size"),
        arg("heads"), arg("kv_heads"), arg("window"), arg("scale"), arg("o_w"), arg("o_b"),
        arg("post_norm"), arg("eps"), arg("isa"), free);
  m.def("dispatch_order", &dispatch_order, arg("rank"), arg("bins"), arg("period"),
        arg("top_k"), free);
  m.def("route_dispatch", &route_dispatch, arg("logits"), arg("mode"), arg("top_k"),
        arg("norm"), arg("norm_eps"), arg("scaling"), arg("rank"), arg("sizes"), arg("x"),
        free);
  m.def("combine",
        [](const at::Tensor& resid, const at::Tensor& rows, const at::Tensor& token,
           const std::vector<at::Tensor>& extras) { return combine(resid, rows, token, extras); },
        arg("resid"), arg("rows"), arg("token"), arg("extras"), free);
}

/* ops.h — the CPU backend's kernels: fp32, row-major, OpenBLAS for the GEMMs.
 *
 * Each kernel mirrors one transformers function (named in its comment) so a mismatch against a
 * golden can be traced to one place.  Threads: GEMMs use OpenBLAS's pool; the loops here use
 * OpenMP over rows or heads (never both at once with BLAS, so the two pools do not fight). */
#ifndef TWN_ENGINE_CPU_OPS_H
#define TWN_ENGINE_CPU_OPS_H

#include <stdint.h>

/* Y[M,N] = alpha * X[M,K] · W[N,K]^T + beta * Y, with leading dimensions ldx, ldy (elements).
 * Small M uses sgemv per row: sgemm's packing of W costs ~3 ms per 2048² matrix whatever M is
 * (cpu-baselines.md §1), so decode steps must not pay it. */
void twn_cpu_linear(const float *X, int M, int K, int ldx, const float *W, int N, float *Y, int ldy,
                    float alpha, float beta);

/* Qwen3VLTextRMSNorm in fp32: out = x * rsqrt(mean(x^2) + eps) * w, over `dim`, for `rows` rows
 * spaced `stride` apart (in-place allowed). */
void twn_cpu_rmsnorm(float *out, const float *x, const float *w, int rows, int dim, int stride,
                     float eps);

/* apply_rotary_pos_emb for `heads` heads of size D in each row: x*cos + rotate_half(x)*sin,
 * cos/sin given per row as [rows, D/2] (dims j and j+D/2 share frequency j). */
void twn_cpu_rope(float *x, int rows, int heads, int D, int row_stride, const float *cos,
                  const float *sin);

/* Qwen3VLTextMLP's act_fn(gate) * up with silu, in place into g: g = g * sigmoid(g) * u. */
void twn_cpu_silu_mul(float *g, const float *u, int64_t n);

/* Causal GQA attention of one sequence (eager_attention_forward):
 *   q   [n, nh*D]   the n new rows, already normed and rotated;
 *   k,v [L, nkv*D]  the cache including the new rows (the new rows are the last n);
 *   out [n, nh*D].
 * Row t attends to cache rows 0 .. L-n+t.  Softmax in fp32 with max subtraction. */
void twn_cpu_attention(const float *q, const float *k, const float *v, float *out, int n, int L,
                       int nh, int nkv, int D, float scale);

/* y[i] = x[i] / max(||x||, eps)  (torch.nn.functional.normalize). */
void twn_cpu_l2_normalize(float *x, int n, float eps);

/* nn.LayerNorm in fp32 over `dim` (biased variance, eps inside the sqrt), weight and bias, for
 * `rows` rows spaced `stride` apart (in-place allowed).  The vision tower's norm1/norm2/merger
 * norms. */
void twn_cpu_layernorm(float *out, const float *x, const float *w, const float *b, int rows,
                       int dim, int stride, float eps);

/* gelu_pytorch_tanh in place: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
void twn_cpu_gelu_tanh(float *x, int64_t n);
/* nn.GELU() (exact, erf) in place: 0.5 x (1 + erf(x / sqrt 2)). */
void twn_cpu_gelu_erf(float *x, int64_t n);

/* Bidirectional (non-causal) multi-head attention over one segment of n tokens, nh heads of D:
 * head h of row t reads q[t*ldq + h*D ..], k/v likewise with ldk/ldv, and writes
 * out[t*ldo + h*D ..].  Softmax in fp32 with max subtraction (eager_attention_forward without a
 * mask).  Returns -1 only when the [n, n] score buffer cannot be allocated. */
int twn_cpu_attention_full(const float *q, int ldq, const float *k, int ldk, const float *v,
                           int ldv, float *out, int ldo, int n, int nh, int D, float scale);

#endif

/* MiTA's attention core on the CPU: only the M + k' open logits of each query.
 *
 * Compiled at first use by mmcbsa/ops/mita_cpu.py (cc -O3 -march=native -ffast-math
 * -fopenmp) and called through ctypes; docs/mechanisms.md §5 and the MiTA docstring give
 * the math, mita_cpu.py the design and the measured speed.
 * One (batch, head) pair is a "group"; groups run in parallel (OpenMP), everything of
 * one group runs sequentially on one thread (so the scatter-adds of the backward need
 * no atomics). All tensors are row-major and contiguous:
 *
 *   y      (B, N, W)   input projection; head h of chunk q is y[b, n, qo + h·P : +P]
 *   out    (B, N, C)   C = H·P, heads concatenated
 *   gout   (B, N, C)   upstream gradient of out
 *   gy     (B, N, W)   gradient of y; the backward writes the q, k, v chunks only
 *   key_idx (G, M, K)  routed keys of each expert (a set: order unspecified)
 *   expert (G, N)      expert of each query
 *   r      (G, M, P)   landmarks;  wts (G, N, Ma + K) softmax weights (Ma = M, or 0
 *   attn   (G, M, N)   in routed mode); attn / agent_v: shared expert (mixture only)
 *   agent_v (G, M, P)
 *
 * The file includes itself once per floating type (REAL = float, double).
 */
#ifndef REAL

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <tgmath.h>

typedef int64_t i64;

/* the adaptive-average-pooling bin [lo, hi) of output cell i of s over an axis of n */
static inline void bin_of(i64 i, i64 n, i64 s, i64 *lo, i64 *hi) {
    *lo = (i * n) / s;
    *hi = ((i + 1) * n + s - 1) / s;
}

#define REAL float
#define UKEY uint32_t
#define ISCALAR int32_t
#define KEYBITS 32
#define CLZ(x) __builtin_clz(x)
#define FN(name) name##_f32
#include __FILE__
#undef REAL
#undef UKEY
#undef ISCALAR
#undef KEYBITS
#undef CLZ
#undef FN

#define REAL double
#define UKEY uint64_t
#define ISCALAR int64_t
#define KEYBITS 64
#define CLZ(x) __builtin_clzll(x)
#define FN(name) name##_f64
#include __FILE__
#undef REAL
#undef UKEY
#undef ISCALAR
#undef KEYBITS
#undef CLZ
#undef FN

#else /* ------------------------------------------------- one floating type */

static inline void FN(axpy)(REAL alpha, const REAL *restrict x, REAL *restrict y, i64 n) {
#pragma omp simd
    for (i64 i = 0; i < n; ++i) y[i] += alpha * x[i];
}

/* ---- the one GEMM-like micro-kernel --------------------------------------------------
 * out_i[c] (+)= mul · Σ_t a_i[t] · b_t[c]   for c < cols, i < cnt, t < red, with
 *   a_i   = abase + (aidx ? aidx[i] : i)·lda,
 *   b_t   = bbase + (bidx ? bidx[t] : t)·ldb   (read in whole blocks of 2·VL columns:
 *           a zero-padded panel, or rows whose width is a multiple of 2·VL),
 *   out_i = obase + (oidx ? oidx[i] : i)·ldo   (overwritten, or accumulated if add).
 * Four rows × four (or two) vectors of columns per pass: 16 (8) independent vector
 * accumulators, each a broadcast-FMA chain over t (no horizontal sums). */
#define VL ((i64)(64 / sizeof(REAL)))
typedef REAL FN(vec) __attribute__((vector_size(64), aligned(sizeof(REAL))));

static inline i64 FN(pad)(i64 cols) { return (cols + 2 * VL - 1) / (2 * VL) * (2 * VL); }

/* row panel: dst[j·pad(P) + d] = mul · row_j[d] (zero padded) */
static void FN(rows)(const REAL *base, i64 ld, const i64 *idx, i64 cnt, i64 P, REAL mul,
                     REAL *dst) {
    const i64 ldb = FN(pad)(P);
    for (i64 j = 0; j < cnt; ++j) {
        const REAL *row = base + (idx ? idx[j] : j) * ld;
        REAL *o = dst + j * ldb;
#pragma omp simd
        for (i64 d = 0; d < P; ++d) o[d] = row[d] * mul;
        for (i64 d = P; d < ldb; ++d) o[d] = 0;
    }
}

/* the A operand of mk: element (i, t) is
 *   base[(idx ? idx[i] : i)·ld + t]   (tr = 0: rows of A), or
 *   base[(idx ? idx[t] : t)·ld + i]   (tr = 1: A is read transposed; no copy is made) */
typedef struct { const REAL *base; i64 ld; const i64 *idx; int tr; } FN(aop);

/* columns [c0, c0 + w) of mk, in blocks of 4 rows × ncv vectors (ncv = 2 or 4: 8 or 16
 * accumulators); w <= ncv·VL, reading ncv·VL columns of B (see mk) */
static inline __attribute__((always_inline)) void FN(mk_cols)(
        FN(aop) A, i64 cnt, const REAL *bbase, i64 ldb, const i64 *bidx, i64 red, REAL mul,
        REAL *obase, i64 ldo, const i64 *oidx, int add, i64 c0, i64 w, const int ncv) {
    typedef FN(vec) vec;
    for (i64 i = 0; i < cnt; i += 4) {
        const int nr = cnt - i < 4 ? (int)(cnt - i) : 4;
        const REAL *a[4];
        i64 off[4];
        for (int r = 0; r < 4; ++r) {  /* missing rows repeat the last one */
            const i64 ii = i + (r < nr ? r : nr - 1);
            off[r] = ii;
            a[r] = A.base + (A.idx ? A.idx[ii] : ii) * A.ld;
        }
        vec acc[4][4];
        for (int r = 0; r < 4; ++r)
            for (int v = 0; v < ncv; ++v) acc[r][v] = (vec){0};
        for (i64 t = 0; t < red; ++t) {
            const REAL *bt = bbase + (bidx ? bidx[t] : t) * ldb + c0;
            vec bv[4];
            for (int v = 0; v < ncv; ++v) bv[v] = *(const vec *)(bt + v * VL);
            REAL x[4];
            if (A.tr) {
                const REAL *at = A.base + (A.idx ? A.idx[t] : t) * A.ld;
                for (int r = 0; r < 4; ++r) x[r] = at[off[r]];
            } else {
                for (int r = 0; r < 4; ++r) x[r] = a[r][t];
            }
            for (int r = 0; r < 4; ++r)
                for (int v = 0; v < ncv; ++v) acc[r][v] += x[r] * bv[v];
        }
        for (int r = 0; r < nr; ++r) {
            REAL *o = obase + (oidx ? oidx[i + r] : i + r) * ldo + c0;
            if (w == ncv * VL) {           /* whole vectors: vector stores */
                for (int v = 0; v < ncv; ++v) {
                    vec *ov = (vec *)(o + v * VL);
                    *ov = add ? *ov + acc[r][v] * mul : acc[r][v] * mul;
                }
                continue;
            }
            REAL tmp[4 * 64 / sizeof(REAL)];
            memcpy(tmp, acc[r], (size_t)ncv * sizeof(vec));
            if (add) for (i64 c = 0; c < w; ++c) o[c] += tmp[c] * mul;
            else for (i64 c = 0; c < w; ++c) o[c] = tmp[c] * mul;
        }
    }
}

static void FN(mk)(FN(aop) A, i64 cnt, const REAL *bbase, i64 ldb, const i64 *bidx,
                   i64 cols, i64 red, REAL mul, REAL *obase, i64 ldo, const i64 *oidx,
                   int add) {
    i64 c0 = 0;
    for (; c0 + 4 * VL <= cols; c0 += 4 * VL)
        FN(mk_cols)(A, cnt, bbase, ldb, bidx, red, mul, obase, ldo, oidx, add, c0, 4 * VL, 4);
    for (; c0 < cols; c0 += 2 * VL)
        FN(mk_cols)(A, cnt, bbase, ldb, bidx, red, mul, obase, ldo, oidx, add, c0,
                    cols - c0 < 2 * VL ? cols - c0 : 2 * VL, 2);
}

/* the rows (base + (idx ? idx[j] : j)·ld, j < cnt, P values each) as a B operand of mk:
 * in place when P is a whole number of column blocks (no read past a row's P values),
 * else copied into the zero-padded scratch */
static const REAL *FN(operand)(const REAL *base, i64 ld, const i64 *idx, i64 cnt, i64 P,
                               REAL *scratch, i64 *ldb, const i64 **bidx) {
    if (P % (2 * VL) == 0) {
        *ldb = ld;
        *bidx = idx;
        return base;
    }
    FN(rows)(base, ld, idx, cnt, P, 1, scratch);
    *ldb = FN(pad)(P);
    *bidx = 0;
    return scratch;
}

/* out (+)= mul · a · rows: mk with the rows as B operand (see operand()) */
static void FN(mk_rows)(FN(aop) A, i64 cnt, const REAL *base, i64 ld, const i64 *idx,
                        i64 red, i64 P, REAL mul, REAL *obase, i64 ldo, const i64 *oidx,
                        int add, REAL *scratch) {
    i64 ldb;
    const i64 *bidx;
    const REAL *b = FN(operand)(base, ld, idx, red, P, scratch, &ldb, &bidx);
    FN(mk)(A, cnt, b, ldb, bidx, P, red, mul, obase, ldo, oidx, add);
}

/* ---- the dot-product micro-kernel -------------------------------------------------------
 * out[i][j] = mul · Σ_d a_i[d] · b_j[d]   for i < na, j < nb, d < P, with
 *   a_i = abase + (aidx ? aidx[i] : i)·lda,   b_j = bbase + (bidx ? bidx[j] : j)·ldb,
 *   out[i][j] at obase + (oidx ? oidx[i] : i)·ldo + j.
 * Blocks of 4 × 4 rows: sixteen vector accumulators over d, then one transposing reduction
 * tree (log2(VL) levels of two lane shuffles and an add, each level halving the number of
 * vectors) turns every VL accumulators into one vector of their VL sums. */
typedef ISCALAR FN(ivec) __attribute__((vector_size(64)));

static void FN(dk)(const REAL *abase, i64 lda, const i64 *aidx, i64 na, const REAL *bbase,
                   i64 ldb, const i64 *bidx, i64 nb, i64 P, REAL mul, REAL *obase, i64 ldo,
                   const i64 *oidx) {
    typedef FN(vec) vec;
    typedef FN(ivec) ivec;
    enum { NV = 64 / sizeof(REAL) };   /* lanes (= VL) */
    const i64 Pv = P - P % NV;
    ivec lo[8], hi[8];                 /* shuffle masks of each level (log2(NV) <= 8) */
    int levels = 0;
    for (i64 w = NV; w > 1; w /= 2, ++levels) {
        const i64 half = w / 2;
        for (i64 l = 0; l < NV; ++l) {
            const i64 src = l < NV / 2 ? 0 : NV, l2 = l % (NV / 2), g = l2 / half, j = l2 % half;
            lo[levels][l] = (ISCALAR)(src + g * w + j);
            hi[levels][l] = (ISCALAR)(src + g * w + half + j);
        }
    }
    REAL res[16];
    for (i64 i0 = 0; i0 < na; i0 += 4) {
        const int nr = na - i0 < 4 ? (int)(na - i0) : 4;
        const REAL *a[4];
        for (int r = 0; r < 4; ++r) {
            const i64 ii = i0 + (r < nr ? r : nr - 1);
            a[r] = abase + (aidx ? aidx[ii] : ii) * lda;
        }
        for (i64 j0 = 0; j0 < nb; j0 += 4) {
            const int nc = nb - j0 < 4 ? (int)(nb - j0) : 4;
            const REAL *b[4];
            for (int c = 0; c < 4; ++c) {
                const i64 jj = j0 + (c < nc ? c : nc - 1);
                b[c] = bbase + (bidx ? bidx[jj] : jj) * ldb;
            }
            vec acc[16];
            for (int t = 0; t < 16; ++t) acc[t] = (vec){0};
            for (i64 d = 0; d < Pv; d += NV) {
                const vec a0 = *(const vec *)(a[0] + d), a1 = *(const vec *)(a[1] + d);
                const vec a2 = *(const vec *)(a[2] + d), a3 = *(const vec *)(a[3] + d);
                for (int c = 0; c < 4; ++c) {
                    const vec bc = *(const vec *)(b[c] + d);
                    acc[c] += a0 * bc; acc[4 + c] += a1 * bc;
                    acc[8 + c] += a2 * bc; acc[12 + c] += a3 * bc;
                }
            }
            for (int grp = 0; grp < 16; grp += NV) {   /* NV accumulators -> NV sums */
                vec cur[NV];
                for (int t = 0; t < NV; ++t) cur[t] = acc[grp + t];
                for (int lev = 0, cnt = NV; cnt > 1; ++lev, cnt /= 2)
                    for (int t = 0; t < cnt / 2; ++t)
                        cur[t] = __builtin_shuffle(cur[2 * t], cur[2 * t + 1], lo[lev]) +
                                 __builtin_shuffle(cur[2 * t], cur[2 * t + 1], hi[lev]);
                memcpy(res + grp, &cur[0], sizeof(vec));
            }
            for (i64 d = Pv; d < P; ++d)
                for (int r = 0; r < 4; ++r)
                    for (int c = 0; c < 4; ++c) res[r * 4 + c] += a[r][d] * b[c][d];
            for (int r = 0; r < nr; ++r) {
                REAL *o = obase + (oidx ? oidx[i0 + r] : i0 + r) * ldo + j0;
                for (int c = 0; c < nc; ++c) o[c] = res[r * 4 + c] * mul;
            }
        }
    }
}

/* queries grouped by expert (counting sort): order[start[e] .. start[e+1]) */
static void FN(by_expert)(const i64 *expert, i64 N, i64 M, i64 *start, i64 *order) {
    memset(start, 0, (size_t)(M + 1) * sizeof(i64));
    for (i64 n = 0; n < N; ++n) ++start[expert[n] + 1];
    for (i64 m = 0; m < M; ++m) start[m + 1] += start[m];
    for (i64 n = 0; n < N; ++n) order[start[expert[n]]++] = n;
    for (i64 m = M; m > 0; --m) start[m] = start[m - 1];
    start[0] = 0;
}

/* in place: row <- softmax(row) (max-subtracted); the exp loop is vectorised through
 * glibc's libmvec (-fno-math-errno, omp simd) */
static void FN(softmax)(REAL *restrict row, i64 n) {
    REAL mx = row[0], sum = 0;
#pragma omp simd reduction(max : mx)
    for (i64 i = 0; i < n; ++i) mx = row[i] > mx ? row[i] : mx;
#pragma omp simd reduction(+ : sum)
    for (i64 i = 0; i < n; ++i) {
        row[i] = exp(row[i] - mx);
        sum += row[i];
    }
    const REAL inv = (REAL)1 / sum;
#pragma omp simd
    for (i64 i = 0; i < n; ++i) row[i] *= inv;
}

/* the indices of the K largest of vals[0..n) into out (unsorted; K <= n; ties: lowest
 * index first). Branch-free radix select: the values become order-preserving unsigned keys,
 * the K-th largest key T is built bit by bit from the top (a bit stays set if at least K
 * keys are >= the candidate: one vectorised counting pass per bit below the common prefix
 * of all keys, stopping as soon as exactly K keys are >= the prefix), then the keys > T
 * and the first keys == T are collected. */
static void FN(topk)(const REAL *vals, i64 n, i64 K, UKEY *key, i64 *out) {
    if (K == n) {
        for (i64 i = 0; i < n; ++i) out[i] = i;
        return;
    }
    const UKEY sign = (UKEY)1 << (KEYBITS - 1);
    UKEY lo = ~(UKEY)0, hi = 0;
    for (i64 i = 0; i < n; ++i) {
        UKEY bits;
        memcpy(&bits, vals + i, sizeof bits);
        const UKEY k = bits ^ (((UKEY)0 - (bits >> (KEYBITS - 1))) | sign);
        key[i] = k;
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
    }
    UKEY t = hi;
    i64 above = n;  /* number of keys >= t */
    if (lo != hi) {
        const int top = KEYBITS - 1 - CLZ(lo ^ hi);  /* highest bit where keys differ */
        t = hi & ~(((UKEY)2 << top) - 1);              /* the common prefix, zeros below */
        for (int bit = top; bit >= 0 && above != K; --bit) {
            const UKEY cand = t | ((UKEY)1 << bit);
            UKEY cnt = 0;  /* counted in the key width: full vector lanes */
#pragma omp simd reduction(+ : cnt)
            for (i64 i = 0; i < n; ++i) cnt += key[i] >= cand;
            if ((i64)cnt >= K) { t = cand; above = (i64)cnt; }
        }
    }
    i64 j = 0;
    if (above == K) {  /* exactly K keys >= t (usually reached long before the last bit) */
        for (i64 i = 0; i < n; ++i) if (key[i] >= t) out[j++] = i;
        return;
    }
    /* t is the K-th largest key: the keys above it, then the first ties */
    for (i64 i = 0; i < n; ++i) if (key[i] > t) out[j++] = i;
    for (i64 i = 0; i < n && j < K; ++i) if (key[i] == t) out[j++] = i;
}

/* landmarks r (M, P) of one group: mean of q over each pooling bin */
static void FN(pool)(const REAL *q, i64 W, i64 P, i64 start, i64 ph, i64 pw, i64 sh,
                     i64 sw, REAL *r) {
    for (i64 i = 0; i < sh; ++i) {
        i64 r0, r1;
        bin_of(i, ph, sh, &r0, &r1);
        for (i64 j = 0; j < sw; ++j) {
            i64 c0, c1;
            bin_of(j, pw, sw, &c0, &c1);
            REAL *rm = r + (i * sw + j) * P;
            memset(rm, 0, (size_t)P * sizeof(REAL));
            for (i64 a = r0; a < r1; ++a)
                for (i64 c = c0; c < c1; ++c) FN(axpy)(1, q + (start + a * pw + c) * W, rm, P);
            REAL inv = (REAL)1 / (REAL)((r1 - r0) * (c1 - c0));
            for (i64 d = 0; d < P; ++d) rm[d] *= inv;
        }
    }
}

/* gq[patch tokens] += pooling-gradient(dr) */
static void FN(pool_backward)(const REAL *dr, i64 W, i64 P, i64 start, i64 ph, i64 pw,
                              i64 sh, i64 sw, REAL *gq) {
    for (i64 i = 0; i < sh; ++i) {
        i64 r0, r1;
        bin_of(i, ph, sh, &r0, &r1);
        for (i64 j = 0; j < sw; ++j) {
            i64 c0, c1;
            bin_of(j, pw, sw, &c0, &c1);
            REAL inv = (REAL)1 / (REAL)((r1 - r0) * (c1 - c0));
            for (i64 a = r0; a < r1; ++a)
                for (i64 c = c0; c < c1; ++c)
                    FN(axpy)(inv, dr + (i * sw + j) * P, gq + (start + a * pw + c) * W, P);
        }
    }
}

int FN(mita_forward)(const REAL *y, i64 B, i64 N, i64 W, i64 H, i64 P, i64 qo, i64 ko,
                     i64 vo, i64 start, i64 ph, i64 pw, i64 sh, i64 sw, i64 K, int routed,
                     i64 *key_idx, i64 *expert, REAL *out, REAL *r, REAL *wts, REAL *attn,
                     REAL *agent_v, int nthreads) {
    const i64 M = sh * sw, Ma = routed ? 0 : M, L = Ma + K, G = B * H, C = H * P;
    const i64 panel_size = (N > L ? N : L) * FN(pad)(P);  /* operand() copies (odd P) */
    const REAL scale = (REAL)1 / sqrt((REAL)P), inv_p = (REAL)1 / (REAL)P;
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 g = 0; g < G; ++g) {
        const i64 b = g / H, h = g % H;
        const REAL *base = y + b * N * W + h * P;
        const REAL *q = base + qo, *k = base + ko, *v = base + vo;
        REAL *rg = r + g * M * P, *wg = wts + g * N * L, *og = out + b * N * C + h * P;
        i64 *kig = key_idx + g * M * K, *exg = expert + g * N;
        REAL *buf = malloc((size_t)(M * N + N * M + panel_size) * sizeof(REAL));
        i64 *ord = malloc((size_t)(2 * N + M + 1) * sizeof(i64));
        if (!buf || !ord) { free(buf); free(ord); failed = 1; continue; }
        REAL *rk = buf, *qr = rk + M * N, *pan = qr + N * M;
        i64 *qorder = ord + N, *qstart = qorder + N;
        FN(pool)(q, W, P, start, ph, pw, sh, sw, rg);                      /* §5.1 */
        FN(dk)(rg, P, 0, M, k, W, 0, N, P, 1, rk, N, 0);                   /* r kᵀ (M, N) */
        for (i64 m = 0; m < M; ++m)                                        /* §5.2 */
            FN(topk)(rk + m * N, N, K, (UKEY *)ord, kig + m * K);
        FN(dk)(q, W, 0, N, rg, P, 0, M, P, 1, qr, M, 0);                   /* q rᵀ (N, M) */
        for (i64 n = 0; n < N; ++n) {                         /* §5.4 and the agent logits */
            const REAL *qrn = qr + n * M;
            REAL mx = qrn[0];
#pragma omp simd reduction(max : mx)
            for (i64 m = 0; m < M; ++m) mx = qrn[m] > mx ? qrn[m] : mx;
            i64 e = 0;
            while (e < M - 1 && qrn[e] != mx) ++e;  /* the first maximum (torch.argmax) */
            exg[n] = e;
#pragma omp simd
            for (i64 m = 0; m < Ma; ++m) wg[n * L + m] = qrn[m] * inv_p;
        }
        REAL *ag = 0;
        if (!routed) {                                                     /* §5.3 */
            REAL *A = attn + g * M * N;
            ag = agent_v + g * M * P;
            for (i64 i = 0; i < M * N; ++i) A[i] = rk[i] * scale;
            for (i64 m = 0; m < M; ++m) FN(softmax)(A + m * N, N);
            FN(mk_rows)((FN(aop)){A, N, 0, 0}, M, v, W, 0, N, P, 1, ag, P, 0, 0, pan); /* A v */
        }
        FN(by_expert)(exg, N, M, qstart, qorder);           /* routed logits, expert by expert */
        for (i64 e = 0; e < M; ++e) {
            const i64 cnt = qstart[e + 1] - qstart[e], *qs = qorder + qstart[e];
            if (cnt) FN(dk)(q, W, qs, cnt, k, W, kig + e * K, K, P, scale, wg + Ma, L, qs);
        }
        for (i64 n = 0; n < N; ++n) FN(softmax)(wg + n * L, L);           /* §5.5 */
        /* out = w_agent agent_v + w_routed v_{I_e} (the latter expert by expert) */
        if (!routed) FN(mk_rows)((FN(aop)){wg, L, 0, 0}, N, ag, P, 0, M, P, 1, og, C, 0, 0, pan);
        for (i64 e = 0; e < M; ++e) {
            const i64 cnt = qstart[e + 1] - qstart[e], *qs = qorder + qstart[e];
            if (cnt)
                FN(mk_rows)((FN(aop)){wg + Ma, L, qs, 0}, cnt, v, W, kig + e * K, K, P, 1, og, C,
                            qs, !routed, pan);
        }
        free(buf);
        free(ord);
    }
    return failed;
}

int FN(mita_backward)(const REAL *y, i64 B, i64 N, i64 W, i64 H, i64 P, i64 qo, i64 ko,
                      i64 vo, i64 start, i64 ph, i64 pw, i64 sh, i64 sw, i64 K, int routed,
                      const i64 *key_idx, const i64 *expert, const REAL *r,
                      const REAL *wts, const REAL *attn, const REAL *agent_v,
                      const REAL *gout, REAL *gy, int nthreads) {
    const i64 M = sh * sw, Ma = routed ? 0 : M, L = Ma + K, G = B * H, C = H * P;
    const i64 panel_size = (N > L ? N : L) * FN(pad)(P);  /* operand() copies (odd P) */
    const REAL scale = (REAL)1 / sqrt((REAL)P), inv_p = (REAL)1 / (REAL)P;
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 g = 0; g < G; ++g) {
        const i64 b = g / H, h = g % H;
        const REAL *base = y + b * N * W + h * P;
        const REAL *q = base + qo, *k = base + ko, *v = base + vo;
        const REAL *go = gout + b * N * C + h * P;  /* rows of stride C */
        REAL *gbase = gy + b * N * W + h * P;
        REAL *gq = gbase + qo, *gk = gbase + ko, *gv = gbase + vo;
        const REAL *rg = r + g * M * P, *wg = wts + g * N * L;
        const i64 *kig = key_idx + g * M * K, *exg = expert + g * N;
        REAL *buf = malloc((size_t)(N * L + M * N + 2 * M * P + panel_size) * sizeof(REAL));
        i64 *ord = malloc((size_t)(N + M + 1) * sizeof(i64));
        if (!buf || !ord) { free(buf); free(ord); failed = 1; continue; }
        REAL *dz = buf, *das = dz + N * L, *du = das + M * N, *dr = du + M * P, *pan = dr + M * P;
        i64 *qorder = ord, *qstart = ord + N;
        for (i64 n = 0; n < N; ++n) {
            memset(gk + n * W, 0, (size_t)P * sizeof(REAL));
            memset(gv + n * W, 0, (size_t)P * sizeof(REAL));
        }
        const REAL *ag = routed ? 0 : agent_v + g * M * P;
        /* ∂w = ∂o · [agent values ; routed values]ᵀ */
        if (!routed) FN(dk)(go, C, 0, N, ag, P, 0, M, P, 1, dz, L, 0);
        FN(by_expert)(exg, N, M, qstart, qorder);
        for (i64 e = 0; e < M; ++e) {
            const i64 cnt = qstart[e + 1] - qstart[e], *qs = qorder + qstart[e];
            if (cnt) FN(dk)(go, C, qs, cnt, v, W, kig + e * K, K, P, 1, dz + Ma, L, qs);
        }
        for (i64 n = 0; n < N; ++n) {          /* ∂z = w ⊙ (∂w − w·∂w) for each query */
            const REAL *row = wg + n * L;
            REAL *dzn = dz + n * L, dot_wd = 0;
#pragma omp simd reduction(+ : dot_wd)
            for (i64 l = 0; l < L; ++l) dot_wd += row[l] * dzn[l];
#pragma omp simd
            for (i64 l = 0; l < L; ++l) dzn[l] = row[l] * (dzn[l] - dot_wd);
        }
        /* per expert: ∂q = ∂z [r/p ; s·k_I], ∂k_I += s·∂zᵀ q, ∂v_I += wᵀ ∂o */
        if (!routed)
            FN(mk_rows)((FN(aop)){dz, L, 0, 0}, N, rg, P, 0, M, P, inv_p, gq, W, 0, 0, pan);
        for (i64 e = 0; e < M; ++e) {
            const i64 cnt = qstart[e + 1] - qstart[e], *qs = qorder + qstart[e];
            const i64 *idx = kig + e * K;
            if (cnt == 0) continue;
            FN(mk_rows)((FN(aop)){dz + Ma, L, qs, 0}, cnt, k, W, idx, K, P, scale, gq, W, qs,
                        !routed, pan);
            FN(mk_rows)((FN(aop)){dz + Ma, L, qs, 1}, K, q, W, qs, cnt, P, scale, gk, W, idx, 1,
                        pan);
            FN(mk_rows)((FN(aop)){wg + Ma, L, qs, 1}, K, go, C, qs, cnt, P, 1, gv, W, idx, 1,
                        pan);
        }
        if (!routed) {                          /* the shared expert */
            const REAL *A = attn + g * M * N;
            /* ∂r = ∂z_agentᵀ q / p,  ∂a = w_agentᵀ ∂o */
            FN(mk_rows)((FN(aop)){dz, L, 0, 1}, M, q, W, 0, N, P, inv_p, dr, P, 0, 0, pan);
            FN(mk_rows)((FN(aop)){wg, L, 0, 1}, M, go, C, 0, N, P, 1, du, P, 0, 0, pan);
            /* agent_v = A v, A = softmax(s · r kᵀ) */
            FN(dk)(du, P, 0, M, v, W, 0, N, P, 1, das, N, 0);             /* ∂a vᵀ (M, N) */
            for (i64 m = 0; m < M; ++m) {       /* das = ∂(r kᵀ) / s  (M, N) */
                const REAL *Am = A + m * N;
                REAL *dm = das + m * N, sum = 0;
#pragma omp simd reduction(+ : sum)
                for (i64 n = 0; n < N; ++n) sum += Am[n] * dm[n];
#pragma omp simd
                for (i64 n = 0; n < N; ++n) dm[n] = Am[n] * (dm[n] - sum);
            }
            FN(mk_rows)((FN(aop)){das, N, 0, 0}, M, k, W, 0, N, P, scale, dr, P, 0, 1, pan);
            FN(mk_rows)((FN(aop)){A, N, 0, 1}, N, du, P, 0, M, P, 1, gv, W, 0, 1, pan);
            FN(mk_rows)((FN(aop)){das, N, 0, 1}, N, rg, P, 0, M, P, scale, gk, W, 0, 1, pan);
            FN(pool_backward)(dr, W, P, start, ph, pw, sh, sw, gq);
        }
        free(buf);
        free(ord);
    }
    return failed;
}

#endif

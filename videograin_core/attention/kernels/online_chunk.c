/* The element-wise part of ST-Layout attention on the CPU, fused: one key chunk at a time,
 * flash-attention style, so a block's logits never leave the cache.
 *
 * The rule (METHOD.md section 2), per query row, logits s in base-2 units:
 *     s'[k] = temp * s[k] + bias[u(k)],  bias[u] = range_scale * (max s - min s) * P[u]
 *     out   = sum_k 2 ** s'[k] v[k] / sum_k 2 ** s'[k]
 * Keys are sorted by region signature ("segment" u), so the bias is constant on each
 * segment, but it needs the range of the WHOLE row. So each segment keeps its own running
 * max m_u (of temp * s), sum_u = sum 2 ** (temp * s - m_u) and output o_u = sum
 * 2 ** (temp * s - m_u) v, plus the raw row max / min; after the last chunk the segments
 * are combined with weights 2 ** (m_u + bias_u - top) (in torch, st_layout.py).
 *
 * This file does the per-chunk update: for a chunk of keys inside ONE segment (the
 * caller computes its logits s [rows, lk] with a matmul; row r belongs to query r % n):
 * update the raw row max / min and the segment's m and sum, write 2 ** (temp * s - m_new)
 * in place (the caller multiplies it with the chunk's values), and alpha =
 * 2 ** (m_old - m_new), the factor the caller rescales o_u by. Two passes over each row
 * (max / min, then exp2 and sum) while the chunk sits in L2.
 *
 * Plain C (gcc/clang vector extensions), no dependencies, no libm. No -ffast-math: with
 * -shared, gcc links crtfastmath, which flushes denormals for the whole process. The
 * Python side calls this through ctypes, which releases the GIL, so worker threads run
 * it in parallel.
 */
#include <stdint.h>
#include <string.h>

/* 8 floats (AVX registers on x86-64 with -march=native, pairs of 128-bit registers
 * elsewhere); explicit, so the speed does not hinge on the auto-vectoriser. A vector
 * comparison gives lanes of all-ones / all-zeros bits. */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
#define W 8

static inline vf8 load8(const float *p) { vf8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, vf8 v) { memcpy(p, &v, sizeof v); }
static inline vf8 splat8(float x) { return (vf8){x, x, x, x, x, x, x, x}; }
static inline vf8 select8(vi8 mask, vf8 a, vf8 b) {   /* mask ? a : b, per lane */
    return (vf8)((mask & (vi8)a) | (~mask & (vi8)b));
}

/* 2 ** x for x <= 0 (x < -126 gives 0): 2 ** round(x) built in the exponent bits, times
 * a degree-6 polynomial for 2 ** f, f = x - round(x) in [-0.5, 0.5] (relative error
 * < 2e-9 in exact arithmetic; fp32 rounding dominates). Coefficients: least-squares fit
 * of 2 ** f on Chebyshev nodes with relative-error weights. Rounding: adding 1.5 * 2**23
 * leaves round(x) in the low mantissa bits of the sum. */
#define ROUNDER 12582912.0f
#define ROUNDER_BITS 0x4B400000
#define EXP2_POLY(p, f, C)              \
    p = C(1.53375768e-4f);              \
    p = p * f + C(1.33998604e-3f);      \
    p = p * f + C(9.61851953e-3f);      \
    p = p * f + C(5.55032900e-2f);      \
    p = p * f + C(2.40226466e-1f);      \
    p = p * f + C(6.93147206e-1f);      \
    p = p * f + C(1.0f);
#define SCALAR(x) (x)

static inline vf8 exp2_nonpos8(vf8 x) {
    vi8 tiny = x < -126.0f;
    vf8 xc = select8(tiny, splat8(-126.0f), x);
    vf8 shifted = xc + ROUNDER;
    vf8 k = shifted - ROUNDER;
    vf8 f = xc - k;
    vf8 p;
    EXP2_POLY(p, f, splat8)
    vi8 e = ((vi8)shifted - ROUNDER_BITS + 127) << 23;   /* the bits of 2.0f ** k */
    return select8(tiny, splat8(0.0f), p * (vf8)e);
}

static inline float exp2_nonpos(float x) {
    if (x < -126.0f) return 0.0f;
    float shifted = x + ROUNDER, k = shifted - ROUNDER, f = x - k, p, scale;
    EXP2_POLY(p, f, SCALAR)
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - ROUNDER_BITS + 127) << 23;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static void segment_extremes(const float *x, int64_t n, float *out_max, float *out_min) {
    float a = x[0], b = x[0];
    int64_t i = 0;
    if (n >= 2 * W) {   /* two accumulators each: independent dependency chains */
        vf8 hi0 = load8(x), hi1 = load8(x + W), lo0 = hi0, lo1 = hi1;
        for (i = 2 * W; i + 2 * W <= n; i += 2 * W) {
            vf8 v0 = load8(x + i), v1 = load8(x + i + W);
            hi0 = select8(v0 > hi0, v0, hi0);
            hi1 = select8(v1 > hi1, v1, hi1);
            lo0 = select8(v0 < lo0, v0, lo0);
            lo1 = select8(v1 < lo1, v1, lo1);
        }
        hi0 = select8(hi1 > hi0, hi1, hi0);
        lo0 = select8(lo1 < lo0, lo1, lo0);
        for (int j = 0; j < W; j++) {
            a = hi0[j] > a ? hi0[j] : a;
            b = lo0[j] < b ? lo0[j] : b;
        }
    }
    for (; i < n; i++) {
        a = x[i] > a ? x[i] : a;
        b = x[i] < b ? x[i] : b;
    }
    *out_max = a;
    *out_min = b;
}

/* x <- 2 ** (t * x + shift) in place; returns the sum of the new values. */
static float exp2_segment(float *x, int64_t n, float t, float shift) {
    vf8 acc0 = splat8(0.0f), acc1 = acc0, vt = splat8(t), vs = splat8(shift);
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
        vf8 e0 = exp2_nonpos8(vt * load8(x + i) + vs);
        vf8 e1 = exp2_nonpos8(vt * load8(x + i + W) + vs);
        store8(x + i, e0);
        store8(x + i + W, e1);
        acc0 += e0;
        acc1 += e1;
    }
    acc0 += acc1;
    float total = 0.0f;
    for (int j = 0; j < W; j++) total += acc0[j];
    for (; i < n; i++) {
        float e = exp2_nonpos(t * x[i] + shift);
        x[i] = e;
        total += e;
    }
    return total;
}

/* One key chunk inside one segment (see the top of the file). seg_max starts at -FLT_MAX
 * (alpha is then 0), seg_sum at 0, row_max at -FLT_MAX, row_min at FLT_MAX. Returns the
 * number of rows whose alpha is not 1 (the caller skips the rescale when none), or -1 for
 * bad sizes. */
int vg_online_chunk(float *s, int64_t rows, int64_t n, int64_t lk, const float *temp,
                    float *seg_max, float *seg_sum, float *row_max, float *row_min, float *alpha) {
    if (n < 1 || lk < 1) return -1;
    int64_t changed = 0;
    for (int64_t r = 0; r < rows; r++) {
        float *x = s + r * lk;
        float t = temp[r % n], cmax, cmin;
        segment_extremes(x, lk, &cmax, &cmin);
        row_max[r] = cmax > row_max[r] ? cmax : row_max[r];
        row_min[r] = cmin < row_min[r] ? cmin : row_min[r];
        float ctop = t >= 0.0f ? t * cmax : t * cmin;
        float m_old = seg_max[r];
        float m_new = ctop > m_old ? ctop : m_old;
        float a = m_new > m_old ? exp2_nonpos(m_old - m_new) : 1.0f;
        changed += m_new > m_old;
        seg_sum[r] = seg_sum[r] * a + exp2_segment(x, lk, t, -m_new);
        seg_max[r] = m_new;
        alpha[r] = a;
    }
    return (int)changed;
}

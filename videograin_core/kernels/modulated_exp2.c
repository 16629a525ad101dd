/* The element-wise middle of one ST-Layout attention block, fused (CPU).
 *
 * Input: s [rows, lk] fp32, the block's logits in base-2 units, rows = heads x n query rows
 * (row r belongs to query r % n). Keys are sorted so that region signature u is the
 * contiguous segment [bounds[u], bounds[u+1]); per query i: temp[i] (the temperature
 * 1 - c when it was not folded into q, else 1), range_scale[i] (turns the row range of s
 * into the bias coefficient) and positive[i, u] (0 or 1: does the query share a region
 * with segment u).
 *
 * Per row, with mx / mn the row max / min of s:
 *     bias[u] = range_scale * (mx - mn) * positive[u]
 *     m[k]    = temp * s[k] + bias[u(k)]          (the modulated logits, METHOD.md sec. 2)
 *     s[k]   <- 2 ** (m[k] - max_k m[k]),  rowsum = sum_k s[k]
 * Two passes over a row (per-segment max / min, then exp2 and sum) while it sits in the
 * L2 cache, instead of five whole-block tensor passes in torch. The exact modulated max
 * comes from the per-segment extremes, so no row can underflow.
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

#define MAX_SEGMENTS 256

/* Returns 0, or -1 when the segments are not usable (the caller then takes the torch path). */
int vg_modulated_exp2(float *s, int64_t rows, int64_t n, int64_t lk,
                      const int64_t *bounds, int64_t nseg,
                      const float *temp, const float *range_scale, const float *positive,
                      float *rowsum) {
    if (nseg < 1 || nseg > MAX_SEGMENTS || n < 1 || bounds[0] != 0 || bounds[nseg] != lk) return -1;
    for (int64_t u = 0; u < nseg; u++)
        if (bounds[u + 1] <= bounds[u]) return -1;      /* empty segments are dropped by the caller */
    float smax[MAX_SEGMENTS], smin[MAX_SEGMENTS];
    for (int64_t r = 0; r < rows; r++) {
        float *x = s + r * lk;
        int64_t i = r % n;
        float t = temp[i];
        float mx = -3.4e38f, mn = 3.4e38f;
        for (int64_t u = 0; u < nseg; u++) {
            segment_extremes(x + bounds[u], bounds[u + 1] - bounds[u], &smax[u], &smin[u]);
            mx = smax[u] > mx ? smax[u] : mx;
            mn = smin[u] < mn ? smin[u] : mn;
        }
        float spread = range_scale[i] * (mx - mn);
        float top = -3.4e38f;            /* exact max of the modulated row */
        for (int64_t u = 0; u < nseg; u++) {
            float seg_top = (t >= 0.0f ? t * smax[u] : t * smin[u]) + spread * positive[i * nseg + u];
            top = seg_top > top ? seg_top : top;
        }
        float total = 0.0f;
        for (int64_t u = 0; u < nseg; u++)
            total += exp2_segment(x + bounds[u], bounds[u + 1] - bounds[u], t,
                                  spread * positive[i * nseg + u] - top);
        rowsum[r] = total;
    }
    return 0;
}

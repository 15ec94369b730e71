/* Task arithmetic and averaging from the stored inputs to the stored output, in one sweep
 * (docs/design.md 3.7). The torch engine forms every task vector in float32, sums them, adds the
 * base and rounds to the output dtype: five sweeps over memory per block. This kernel does the
 * same float32 operations per entry, in the same order, on the raw bf16/fp16/fp32 slices:
 *
 *   tau_i = f32(model_i) - f32(base)          (exact conversions)
 *   w_i   = tau_i * weight_i                  (when weights are given)
 *   total = ((w_0 + w_1) + w_2) + ...         (task order, as core.formulas.sum_over_tasks)
 *   total = total / divisor                   (when divisor != 0)
 *   theta = f32(base) + total                 (lam == 1), else f32(base) + lam * total
 *   out   = theta rounded to the output dtype (round to nearest even)
 *
 * It must be compiled without contraction (-ffp-contract=off: no a * b + c fused into one
 * rounding), which pcb_fast/cpu/native.py passes. Returns the number of outputs that are not finite
 * (the caller redoes such a block with torch, which names the culprit). */
#include "native.h"

#define CHUNK 2048 /* entries per step: the base and the running total stay in L1 */

/* float to IEEE half, round to nearest even (overflow to infinity, NaN stays NaN). */
static inline uint16_t f16_of_f32(float f)
{
    uint32_t u = bits_of(f), sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) /* infinity or NaN */
        return (uint16_t)(sign | 0x7C00 | (a > 0x7F800000u ? 0x200 | ((a >> 13) & 0x3FF) : 0));
    if (a >= 0x477FF000u) /* rounds to 65520 or more: infinity */
        return (uint16_t)(sign | 0x7C00);
    if (a < 0x38800000u) { /* below the smallest normal half (2^-14): subnormal or zero */
        /* a multiple of 2^-24 after rounding: adding 0.5 makes the FPU round at that bit */
        float rounded = float_of(a) + 0.5f;
        return (uint16_t)(sign | (bits_of(rounded) - 0x3F000000u));
    }
    uint32_t odd = (a >> 13) & 1;
    a += 0xC8000FFFu + odd; /* rebias the exponent (-112 << 23) and round at bit 13 */
    return (uint16_t)(sign | (a >> 13));
}

/* float to bfloat16, round to nearest even (NaN kept a quiet NaN). */
static inline uint16_t bf16_of_f32(float f)
{
    uint32_t u = bits_of(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

/* Writes dst[start + j] and returns how many of them are not finite. */
static int64_t store(const float *restrict src, int64_t m, void *dst, int dtype, int64_t start)
{
    int64_t bad = 0;
    if (dtype == BF16) {
        uint16_t *d = (uint16_t *)dst + start;
        for (int64_t j = 0; j < m; j++) {
            uint16_t o = bf16_of_f32(src[j]);
            d[j] = o;
            bad += (o & 0x7F80) == 0x7F80;
        }
    } else if (dtype == F16) {
        uint16_t *d = (uint16_t *)dst + start;
        for (int64_t j = 0; j < m; j++) {
            uint16_t o = f16_of_f32(src[j]);
            d[j] = o;
            bad += (o & 0x7C00) == 0x7C00;
        }
    } else {
        float *d = (float *)dst + start;
        for (int64_t j = 0; j < m; j++) {
            d[j] = src[j];
            bad += (bits_of(src[j]) & 0x7F800000u) == 0x7F800000u;
        }
    }
    return bad;
}

/* t[j] = b[j] + t[j] (lam == 1: 1 * x == x, one operation fewer, the same bits), else b[j] + lam * t[j]:
 * core.formulas.merged_weights. */
static void add_base(const float *restrict b, float *restrict t, float lam, int64_t count)
{
    if (lam == 1.0f)
        for (int64_t j = 0; j < count; j++)
            t[j] = b[j] + t[j];
    else
        for (int64_t j = 0; j < count; j++)
            t[j] = b[j] + lam * t[j];
}

int64_t weighted_merge(int64_t n, int64_t m, const void *const *models, const int32_t *model_dtypes,
                       const void *base, int32_t base_dtype, const float *weights, float divisor,
                       float lam, void *out, int32_t out_dtype, int threads)
{
    (void)threads;
    int64_t bad = 0;
    const int64_t chunks = (m + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad)
    for (int64_t c = 0; c < chunks; c++) {
        float b[CHUNK], x[CHUNK], total[CHUNK];
        const int64_t start = c * CHUNK, count = m - start < CHUNK ? m - start : CHUNK;
        load_f32(base, base_dtype, start, count, b);
        for (int64_t i = 0; i < n; i++) {
            load_f32(models[i], model_dtypes[i], start, count, x);
            if (weights != 0) {
                const float w = weights[i];
                for (int64_t j = 0; j < count; j++)
                    x[j] = (x[j] - b[j]) * w;
            } else {
                for (int64_t j = 0; j < count; j++)
                    x[j] = x[j] - b[j];
            }
            if (i == 0)
                memcpy(total, x, (size_t)count * 4);
            else
                for (int64_t j = 0; j < count; j++)
                    total[j] = total[j] + x[j];
        }
        if (divisor != 0.0f)
            for (int64_t j = 0; j < count; j++)
                total[j] = total[j] / divisor;
        add_base(b, total, lam, count);
        bad += store(total, count, out, out_dtype, start);
    }
    return bad;
}

/* The sink's last step for any method: out = rounded(f32(base) + tau_m) (lam == 1), else
 * rounded(f32(base) + lam * tau_m), as core.formulas.merged_weights then .to(out dtype). Returns the
 * number of outputs that are not finite. */
int64_t merged_output(int64_t m, const void *base, int32_t base_dtype, const float *tau_m, float lam, void *out,
                      int32_t out_dtype, int threads)
{
    (void)threads;
    int64_t bad = 0;
    const int64_t chunks = (m + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad)
    for (int64_t c = 0; c < chunks; c++) {
        float theta[CHUNK];
        const int64_t start = c * CHUNK, count = m - start < CHUNK ? m - start : CHUNK;
        float b[CHUNK];
        load_f32(base, base_dtype, start, count, b);
        memcpy(theta, tau_m + start, (size_t)count * 4);
        add_base(b, theta, lam, count);
        bad += store(theta, count, out, out_dtype, start);
    }
    return bad;
}

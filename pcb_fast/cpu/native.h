/* Helpers and prototypes shared by the C kernels of pcb_fast.cpu.native (compiled into one library). */
#ifndef PCB_FAST_NATIVE_H
#define PCB_FAST_NATIVE_H

#include <stdint.h>
#include <string.h>

/* The bit pattern of a float, and back (memcpy: no aliasing question, one move once compiled). */
static inline uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float float_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* |x| as a bit pattern: non-negative floats order as their bit patterns, NaN (any payload) above
 * +inf, so an integer max of these is torch.amax of |x| (NaN wins) and it vectorizes. */
static inline uint32_t magnitude_bits(float x)
{
    return bits_of(x) & 0x7FFFFFFFu;
}

static inline uint32_t max_u32(uint32_t a, uint32_t b)
{
    return a > b ? a : b;
}

/* One round of DARE's counter hash (pcb_fast/core/rng.py, docs/design.md 5.4), products mod 2^32. */
static inline uint32_t mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

/* dtype codes of the stored inputs (pcb_fast.cpu.native.KERNEL_DTYPES) */
enum { F32 = 0, BF16 = 1, F16 = 2 };

/* IEEE half to float, exact (normals, subnormals, infinities, NaN payloads shifted). */
static inline float f32_of_f16(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0x1F)
        return float_of(sign | 0x7F800000u | (mantissa << 13));
    if (exponent != 0)
        return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
    /* zero or subnormal: mantissa * 2^-24, exact in float32 */
    float magnitude = (float)mantissa * 5.9604644775390625e-8f;
    return float_of(sign | bits_of(magnitude));
}

/* dst[j] = f32(src[start + j]) for j < m */
static inline void load_f32(const void *src, int dtype, int64_t start, int64_t m, float *restrict dst)
{
    if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t j = 0; j < m; j++)
            dst[j] = float_of((uint32_t)s[j] << 16);
    } else if (dtype == F16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t j = 0; j < m; j++)
            dst[j] = f32_of_f16(s[j]);
    } else {
        memcpy(dst, (const float *)src + start, (size_t)m * 4);
    }
}

/* f32(src[j]) of a stored slice of dtype F32, BF16 or F16 (exact) */
static inline float f32_at(const void *src, int dtype, int64_t j)
{
    if (dtype == BF16)
        return float_of((uint32_t)((const uint16_t *)src)[j] << 16);
    if (dtype == F16)
        return f32_of_f16(((const uint16_t *)src)[j]);
    return ((const float *)src)[j];
}

/* How a block's entries are kept: TIES' trim, or DARE's drop. */
typedef struct {
    int drop;               /* 0: trim by t/cut, 1: DARE's drop */
    const float *t;         /* trim: [n] thresholds */
    const int64_t *cut;     /* trim: [n] entries equal to t are kept at positions < cut */
    const uint32_t *stream; /* drop: [n] stream constants, their mix32, keep thresholds (24 bits) */
    const uint32_t *high;
    const uint32_t *threshold;
    int64_t lo;          /* drop: index of the block's first entry in its tensor */
    const float *scale;  /* drop: [n] 1 - p_i, the divisors of the survivors, or (multiply) their factors */
    int multiply;        /* drop: survivors multiplied by scale_i (mergekit's L1 rescale, or 1: none) */
} keep_rule;

/* The kernels pcb_fast.cpu.native calls (its SIGNATURES must match these; the definitions are
 * checked against them by the compiler, since every source includes this header). */
int row_order_statistics(const uint32_t *bits, int64_t rows, int64_t rows_per_group, int64_t group_stride,
                         int64_t length, int64_t rank_a, int64_t rank_b, float *out_a, float *out_b, int threads);
void dare_keep_masks(int64_t lo, int64_t m, int64_t n, const uint32_t *streams, const uint32_t *highs,
                     const uint32_t *thresholds, uint8_t *out, int threads);
void tv_bracket(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                const int32_t *raw_dtypes, const float *floor_, const float *ceiling, float *row_max, int64_t *above,
                int64_t *at_ceiling, int64_t *at_floor, float *inside, int64_t *inside_counts, int threads);
void tv_equal_counts(const float *tv, int64_t n, int64_t m, int64_t stride, const float *t, int64_t *counts,
                     int threads);
int tv_merge_block(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                   const int32_t *raw_dtypes, const keep_rule *rule, const float *lam, int elect, float fill, int divide,
                   float *values, int64_t *signs, int64_t *undecided, int32_t *open_at, float *open_values,
                   int64_t *kept, float *row_max, int threads);
void collect_counts(const float *scores, int64_t n, int64_t m, int64_t score_stride, const float *floor_,
                    int64_t *counts, int threads);
void collect_entries(const float *scores, const float *tv, int64_t n, int64_t m, int64_t score_stride,
                     int64_t tv_stride, const float *floor_, const int64_t *offsets, int32_t *flat,
                     float *out_scores, float *out_tau, int threads);
int64_t weighted_merge(int64_t n, int64_t m, const void *const *models, const int32_t *model_dtypes,
                       const void *base, int32_t base_dtype, const float *weights, float divisor,
                       float lam, void *out, int32_t out_dtype, int threads);
void task_vectors(int64_t n, int64_t m, const void *const *models, const int32_t *model_dtypes, const void *base,
                  int32_t base_dtype, float *base32, float *out, int64_t out_stride, int threads);
int64_t merged_output(int64_t m, const void *base, int32_t base_dtype, const float *tau_m, float lam, void *out,
                      int32_t out_dtype, int threads);
int64_t pcb_candidates(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                       const int32_t *raw_dtypes, const float *lo, const float *hi, const float *span, float nf,
                       int normalized, const float *floor_, const float *ceiling, int64_t *above, int64_t *counts,
                       int32_t *flat, float *tau, float *exp_arg, float *tanh_arg, int threads);
void pcb_bracket_counts(int64_t n, const int64_t *counts, const float *score, const float *floor_,
                        const float *ceiling, int64_t *above, int64_t *at_ceiling, int64_t *at_floor, float *peak,
                        float *inside, int64_t *inside_counts);
void collected_split(int64_t n, const int64_t *counts, const float *score, const float *top, int64_t *above,
                     float *maxima, float *below, int64_t *below_counts);
int64_t pcb_keep(int64_t n, int64_t *counts, int32_t *flat, float *score, float *tau, const float *floor_);
void pcb_merge_entries(int64_t n, int64_t m, const int64_t *offsets, const int32_t *flat, const float *score,
                       const float *tau, const float *t, const float *keep_span, const float *lo, const float *hi,
                       const float *lam, float *out, float *den);
void pcb_approximations(int64_t count, const float *x, float *exp_out, float *tanh_out);
void pcb_score_bounds(int64_t count, const float *e, const float *w, float *out);
void pcb_gather_tau(int64_t n, int64_t m, const void *const *raw, const int32_t *raw_dtypes, const int64_t *offsets,
                    const int32_t *flat, float *out);
int pcb_clip_tails(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                   const int32_t *raw_dtypes, int64_t k_low, int64_t k_high, uint32_t *low_sets,
                   uint32_t *high_sets, int64_t *sizes, int64_t *bounds, int64_t first, int64_t step,
                   int64_t columns, float *sample, float *row_max, int threads);
int pcb_tail_values(int64_t n, uint32_t *sets, const int64_t *sizes, int64_t k, uint32_t *out);

#endif

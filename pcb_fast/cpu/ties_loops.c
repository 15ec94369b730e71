/* The block loops of TIES, DARE and DARE-TIES in C (docs/design.md 3.5): the eager engine's float32
 * operations per entry, in its order, so that the values are the eager engine's bit for bit (signed
 * zeros included), in one sweep over a block instead of a dozen torch ops. No transcendental
 * function is involved, so nothing here depends on a math library. Compiled without contraction
 * (-ffp-contract=off, see native.py).
 *
 * A block is n task rows of m float32 entries, row i at tv + i * stride, or the stored slices the
 * rows are formed from (x_i = f32(model_i) - f32(base), the bits of the sources' blocks). Per entry j:
 *   trim (TIES):  w_i = (x_i * keep_i) * lam_i, keep_i = |x_i| > t_i or (|x_i| == t_i and j < cut_i)
 *   drop (DARE):  w_i = ((x_i * keep_i) / scale_i) * lam_i, keep_i from the counter hash of dare_hash.c
 *                 (mergekit's L1 rescale, or none: ((x_i * keep_i) * factor_i) * lam_i, factor 1 for none)
 *   total = ((w_0 + w_1) + w_2) + ...   (task order; core.formulas.sum_over_tasks)
 *   election (formulas.disjoint_mean): s = sign(total), or fill where 0; agree_i = s > 0 ? w_i > 0 : w_i < 0;
 *   value = sum_i w_i * agree_i / (sum_i agree_i * lam_i, 1 where 0; 1 without divide) */
#include <math.h>
#include <stdlib.h>

#include "native.h"

#define CHUNK 512 /* entries per step: n rows of weighted values stay in L1/L2 */

/* The block's row i from j0 on (count entries): tv's own row, or with ``raw`` (the stored slices
 * raw[0], the base, and raw[1 + i], model i, of dtypes raw_dtypes[.]) tau formed into ``formed``:
 * f32(model_i[j]) - f32(base[j]), the bits of torch.sub (the sources' blocks). ``base``: the base's
 * f32 values of those entries, loaded by the caller. */
static inline const float *task_row(const float *tv, int64_t stride, const void *const *raw, const int32_t *raw_dtypes,
                                    int64_t i, int64_t j0, int64_t count, const float *base, float *formed)
{
    if (raw == NULL)
        return tv + i * stride + j0;
    load_f32(raw[1 + i], raw_dtypes[1 + i], j0, count, formed);
    for (int64_t j = 0; j < count; j++)
        formed[j] = formed[j] - base[j];
    return formed;
}

/* For each task row (of tv, or formed from ``raw``, see task_row): max |x| (NaN if any), counts of
 * |x| > ceiling, == ceiling, == floor, and the |x| strictly between floor and ceiling, written in
 * order to inside + i * m (inside_counts[i] of them). */
void tv_bracket(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                const int32_t *raw_dtypes, const float *floor_, const float *ceiling, float *row_max, int64_t *above,
                int64_t *at_ceiling, int64_t *at_floor, float *inside, int64_t *inside_counts, int threads)
{
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float lo = floor_[i], hi = ceiling[i];
        float *out = inside + i * m;
        float base[CHUNK], formed[CHUNK];
        uint8_t flag[CHUNK];
        uint32_t mx = 0;
        int64_t count_above = 0, count_ceiling = 0, count_floor = 0, count_inside = 0;
        for (int64_t j0 = 0; j0 < m; j0 += CHUNK) {
            const int64_t count = m - j0 < CHUNK ? m - j0 : CHUNK;
            if (raw != NULL)
                load_f32(raw[0], raw_dtypes[0], j0, count, base);
            const float *x = task_row(tv, stride, raw, raw_dtypes, i, j0, count, base, formed);
            uint32_t a_above = 0, a_ceiling = 0, a_floor = 0, a_inside = 0;
            for (int64_t j = 0; j < count; j++) {
                const float a = fabsf(x[j]);
                const uint8_t in = (a > lo) & (a < hi);
                mx = max_u32(mx, bits_of(a));
                a_above += a > hi;
                a_ceiling += a == hi;
                a_floor += a == lo;
                a_inside += in;
                flag[j] = in;
            }
            count_above += a_above;
            count_ceiling += a_ceiling;
            count_floor += a_floor;
            if (a_inside) { /* few entries: skip 8 flags at a time */
                for (int64_t j = count; j < CHUNK && (j & 7); j++)
                    flag[j] = 0;
                for (int64_t j8 = 0; j8 < count; j8 += 8) {
                    uint64_t word;
                    memcpy(&word, flag + j8, 8);
                    while (word) {
                        out[count_inside++] = fabsf(x[j8 + (__builtin_ctzll(word) >> 3)]);
                        word &= word - 1;
                    }
                }
            }
        }
        row_max[i] = float_of(mx);
        above[i] = count_above;
        at_ceiling[i] = count_ceiling;
        at_floor[i] = count_floor;
        inside_counts[i] = count_inside;
    }
}

/* For each task row: entries with |x| == t[i]. */
void tv_equal_counts(const float *tv, int64_t n, int64_t m, int64_t stride, const float *t, int64_t *counts,
                     int threads)
{
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *x = tv + i * stride;
        const float ti = t[i];
        int64_t count = 0;
        for (int64_t j = 0; j < m; j++)
            count += fabsf(x[j]) == ti;
        counts[i] = count;
    }
}


/* DARE's drop of entries j0 .. j0 + count - 1 of one task row (see weigh); ``multiply`` is a constant
 * where this is inlined, so that each form's loop vectorizes. */
static inline __attribute__((always_inline)) int weigh_drop(const keep_rule *rule, const float *x, int64_t j0,
                                                           int64_t count, float lam, float *restrict w, uint32_t *mx,
                                                           uint32_t stream, uint32_t high, uint32_t threshold,
                                                           float scale, int multiply)
{
    int kept = 0;
    const uint64_t first = (uint64_t)(rule->lo + j0), last = first + (uint64_t)count - 1;
    uint32_t row_max = *mx;
    if ((first >> 32) == (last >> 32)) { /* 32-bit counters (the common case: they vectorize) */
        const uint32_t start = (uint32_t)first, high_word = (uint32_t)(first >> 32) ^ high;
        for (int64_t j = 0; j < count; j++) {
            const uint32_t h = mix32(mix32((start + (uint32_t)j) ^ stream) ^ high_word);
            const int keep = (h >> 8) >= threshold;
            w[j] = (multiply ? (x[j] * (float)keep) * scale : (x[j] * (float)keep) / scale) * lam;
            kept += keep;
            row_max = max_u32(row_max, magnitude_bits(x[j]));
        }
    } else { /* the chunk crosses a multiple of 2^32 */
        for (int64_t j = 0; j < count; j++) {
            const uint64_t index = first + (uint64_t)j;
            const uint32_t h = mix32(mix32((uint32_t)index ^ stream) ^ (uint32_t)(index >> 32) ^ high);
            const int keep = (h >> 8) >= threshold;
            w[j] = (multiply ? (x[j] * (float)keep) * scale : (x[j] * (float)keep) / scale) * lam;
            kept += keep;
            row_max = max_u32(row_max, magnitude_bits(x[j]));
        }
    }
    *mx = row_max;
    return kept;
}

/* w[j] = the weighted, kept entries j0 .. j0 + count - 1 of task row x (task i); returns how many are
 * kept. With the drop, *mx takes the largest |x| (as bits, see magnitude_bits in native.h). */
static int weigh(const keep_rule *rule, int64_t i, const float *x, int64_t j0, int64_t count, float lam,
                 float *restrict w, uint32_t *mx)
{
    int kept = 0;
    if (!rule->drop) {
        const float ti = rule->t[i];
        const int64_t cut = rule->cut[i] - j0; /* positions relative to this chunk */
        for (int64_t j = 0; j < count; j++) {
            const float a = fabsf(x[j]);
            const int keep = (a > ti) | ((a == ti) & (j < cut));
            w[j] = (x[j] * (float)keep) * lam;
            kept += keep;
        }
        return kept;
    }
    const uint32_t stream = rule->stream[i], high = rule->high[i], threshold = rule->threshold[i];
    const float scale = rule->scale[i];
    if (rule->multiply)
        return weigh_drop(rule, x, j0, count, lam, w, mx, stream, high, threshold, scale, 1);
    return weigh_drop(rule, x, j0, count, lam, w, mx, stream, high, threshold, scale, 0);
}

/* The value at position j of a chunk (weighted entries w, rows CHUNK apart) whose entries must agree
 * with the sign ``elected``: the operations of tv_merge_block's mean (or sum), in its order. */
static float agreeing_mean(const float *w, int64_t n, int64_t j, const float *lam, float elected, int divide)
{
    float num = 0.0f, den = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float wi = w[i * CHUNK + j];
        const float agree = (float)(elected > 0 ? wi > 0 : wi < 0);
        num = i == 0 ? wi * agree : num + wi * agree;
        den = i == 0 ? agree * lam[i] : den + agree * lam[i];
    }
    return divide ? num / (den == 0 ? 1.0f : den) : num;
}

/* TIES' election and disjoint mean (elect != 0), or the plain sum over tasks (elect == 0), of a block.
 * Returns 0, or -1 when scratch memory could not be had. kept[n] and row_max[n] (drop only) are
 * filled; signs: the sum of the elected signs; undecided: positions with a zero total and some
 * non-zero entry (their value depends on fill). With ``open_at`` and ``open_values`` (m entries of
 * room each, or NULL), the undecided positions in ascending order and the values they take under
 * the other fill (-1 for a positive fill, else +1) are written to their first ``undecided``
 * entries. With ``raw``, the block's rows are formed from the stored slices (see task_row), tv
 * unused. */
int tv_merge_block(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                   const int32_t *raw_dtypes, const keep_rule *rule, const float *lam, int elect, float fill, int divide,
                   float *values, int64_t *signs, int64_t *undecided, int32_t *open_at, float *open_values,
                   int64_t *kept, float *row_max, int threads)
{
    (void)threads;
    const int64_t chunks = (m + CHUNK - 1) / CHUNK;
    int failed = 0;
    int64_t sign_sum = 0, undecided_sum = 0;
    const int others = elect && open_at != NULL && open_values != NULL;
    const float other = fill > 0 ? -1.0f : 1.0f; /* the other fill (0 elects as -1 does: w < 0 agree) */
    uint32_t *max_bits_of = calloc((size_t)n, sizeof(uint32_t));
    int32_t *open_in_chunk = others ? calloc((size_t)chunks, sizeof(int32_t)) : NULL;
    if (max_bits_of == NULL || (others && open_in_chunk == NULL)) {
        free(max_bits_of);
        return -1;
    }
    for (int64_t i = 0; i < n; i++)
        kept[i] = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sign_sum, undecided_sum) reduction(| : failed)
    {
        float *w = malloc((size_t)n * CHUNK * sizeof(float));
        int64_t *my_kept = calloc((size_t)n, sizeof(int64_t));
        uint32_t *my_max = calloc((size_t)n, sizeof(uint32_t));
        if (w == NULL || my_kept == NULL || my_max == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t j0 = c * CHUNK, count = m - j0 < CHUNK ? m - j0 : CHUNK;
                float total[CHUNK], largest[CHUNK], elected[CHUNK], num[CHUNK], den[CHUNK], base[CHUNK], formed[CHUNK];
                uint8_t undecided_at[CHUNK];
                if (raw != NULL)
                    load_f32(raw[0], raw_dtypes[0], j0, count, base);
                for (int64_t i = 0; i < n; i++)
                    my_kept[i] += weigh(rule, i, task_row(tv, stride, raw, raw_dtypes, i, j0, count, base, formed), j0,
                                        count, lam[i], w + i * CHUNK, &my_max[i]);
                for (int64_t j = 0; j < count; j++)
                    total[j] = n > 1 ? w[j] + w[CHUNK + j] : w[j];
                for (int64_t i = 2; i < n; i++)
                    for (int64_t j = 0; j < count; j++)
                        total[j] = total[j] + w[i * CHUNK + j];
                if (!elect) {
                    memcpy(values + j0, total, (size_t)count * sizeof(float));
                    continue;
                }
                for (int64_t j = 0; j < count; j++)
                    largest[j] = fabsf(w[j]);
                for (int64_t i = 1; i < n; i++)
                    for (int64_t j = 0; j < count; j++) {
                        const float a = fabsf(w[i * CHUNK + j]);
                        largest[j] = a > largest[j] ? a : largest[j];
                    }
                int positive = 0, negative = 0, open = 0;
                for (int64_t j = 0; j < count; j++) {
                    const float t = total[j];
                    positive += t > 0;
                    negative += t < 0;
                    undecided_at[j] = (t == 0) & (largest[j] > 0);
                    open += undecided_at[j];
                    /* the sign each entry must agree with */
                    elected[j] = t > 0 ? 1.0f : t < 0 ? -1.0f : fill;
                }
                sign_sum += positive - negative;
                undecided_sum += open;
                for (int64_t i = 0; i < n; i++) {
                    const float *wi = w + i * CHUNK;
                    const float li = lam[i];
                    if (i == 0)
                        for (int64_t j = 0; j < count; j++) {
                            const float agree = (float)(elected[j] > 0 ? wi[j] > 0 : wi[j] < 0);
                            num[j] = wi[j] * agree;
                            den[j] = agree * li;
                        }
                    else
                        for (int64_t j = 0; j < count; j++) {
                            const float agree = (float)(elected[j] > 0 ? wi[j] > 0 : wi[j] < 0);
                            num[j] = num[j] + wi[j] * agree;
                            den[j] = den[j] + agree * li;
                        }
                }
                for (int64_t j = 0; j < count; j++)
                    values[j0 + j] = divide ? num[j] / (den[j] == 0 ? 1.0f : den[j]) : num[j];
                if (others && open) { /* few positions: each one's value under the other fill */
                    int32_t k = 0;
                    for (int64_t j = count; j < CHUNK && (j & 7); j++)
                        undecided_at[j] = 0; /* (read 8 at a time) */
                    for (int64_t j8 = 0; j8 < count; j8 += 8) { /* 8 flags at a time, skipping zeros */
                        uint64_t word;
                        memcpy(&word, undecided_at + j8, 8);
                        while (word) {
                            const int64_t j = j8 + (__builtin_ctzll(word) >> 3);
                            word &= word - 1;
                            open_at[j0 + k] = (int32_t)(j0 + j);
                            open_values[j0 + k] = agreeing_mean(w, n, j, lam, other, divide);
                            k++;
                        }
                    }
                    open_in_chunk[c] = k;
                }
            }
#pragma omp critical
            for (int64_t i = 0; i < n; i++) {
                kept[i] += my_kept[i];
                max_bits_of[i] = max_u32(max_bits_of[i], my_max[i]);
            }
        }
        free(w);
        free(my_kept);
        free(my_max);
    }
    for (int64_t i = 0; i < n; i++)
        row_max[i] = float_of(max_bits_of[i]);
    free(max_bits_of);
    if (others && !failed) { /* each chunk's positions were written at its start: close the gaps */
        int64_t at = 0;
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t k = open_in_chunk[c];
            memmove(open_at + at, open_at + c * CHUNK, (size_t)k * sizeof(int32_t));
            memmove(open_values + at, open_values + c * CHUNK, (size_t)k * sizeof(float));
            at += k;
        }
    }
    free(open_in_chunk);
    *signs = sign_sum;
    *undecided = undecided_sum;
    return failed ? -1 : 0;
}

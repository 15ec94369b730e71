/* PCB official's score and merge sweeps in C (docs/design.md 3.5), bit for bit the eager engine's.
 *
 * The eager engine scores a block with a dozen torch ops, P = exp(N * N * n) * tanh(x * total)
 * (pcb_fast.cpu.pcb_blocks.official_scores), exp and tanh from torch's own vector library. Those two
 * cost most of a PCB merge, and the selection and the merge need the exact P of only the entries
 * at or above a floor (about the keep ratio of each row). So this sweep hands back only candidates,
 * with the float32 arguments of exp and tanh that the eager engine would pass (the same operations
 * in the same order, so the same bits); the caller applies torch's exp and tanh to those arguments
 * and keeps the entries whose exact score reaches the floor: the entries, scores and values of the
 * eager collection exactly. At a positive floor (the common case) the candidates are the entries
 * whose upper bound of P (score_bound: no transcendental function) reaches the floor minus a
 * margin far wider than any rounding (CANDIDATE_MARGIN); elsewhere, those whose approximate P (a
 * fast vectorised exp and tanh, within a few ulps) does.
 *
 * Then the merge of the collected entries (core.engine.Entries with pcb's step 6-7): no
 * transcendental function, the eager float32 operations per entry, sums in task order from +0.
 * Compiled without contraction (-ffp-contract=off, see native.py). */
#include <math.h>
#include <stdlib.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

#include "native.h"

#define PCB_CHUNK 1024 /* columns per step: n rows of arguments stay in L1/L2 */

/* Relative margin of the candidate test: 2^-12, about 4000 times the approximations' error
 * (tests/test_native.py measures it against torch's exp and tanh). */
#define CANDIDATE_MARGIN 2.44140625e-4f
#define CANDIDATE_FLOOR_ABS 1e-30f /* and an absolute one, for scores near zero */

/* a * b + c for the approximations only (never for the values that must equal torch's): one fused
 * rounding where the target has FMA (more accurate and half the operations), two otherwise (fmaf
 * would then be a library call). */
#ifdef __FMA__
#define MADD(a, b, c) fmaf((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* exp(x) for x in [-80, 88] within about 2 ulps (Cody-Waite reduction, Cephes' polynomial), branch
 * free so that loops of it vectorize. */
static inline float approx_exp(float x)
{
    x = x < -80.0f ? -80.0f : (x > 88.0f ? 88.0f : x);
    const float k = MADD(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = MADD(k, -0.693359375f, x);
    r = MADD(k, 2.12194440e-4f, r);
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = MADD(p, r, 1.3981999507e-3f);
    p = MADD(p, r, 8.3334519073e-3f);
    p = MADD(p, r, 4.1665795894e-2f);
    p = MADD(p, r, 1.6666665459e-1f);
    p = MADD(p, r, 5.0000001201e-1f);
    p = MADD(p, z, r) + 1.0f;
    return p * float_of((uint32_t)((int32_t)k + 127) << 23);
}

/* tanh(x) for |x| < 0.625 within a few ulps (Cephes' odd polynomial; tanh(-0) = -0). */
static inline float approx_tanh_small(float x)
{
    const float a = fabsf(x), z = a * a;
    float p = -5.70498872745e-3f;
    p = MADD(p, z, 2.06390887954e-2f);
    p = MADD(p, z, -5.37397155531e-2f);
    p = MADD(p, z, 1.33314422036e-1f);
    p = MADD(p, z, -3.33332819422e-1f);
    return float_of(bits_of(MADD(p * z, a, a)) | (bits_of(x) & 0x80000000u));
}

/* tanh(x) within a few ulps: approx_tanh_small below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above,
 * with the sign of x; +-1 for large |x| and infinities. */
static inline float approx_tanh(float x)
{
    const float a = fabsf(x);
    const float e = approx_exp(2.0f * (a > 10.0f ? 10.0f : a)); /* tanh(10) rounds to 1; NaN stays NaN */
    const float large = float_of(bits_of(1.0f - 2.0f / (e + 1.0f)) | (bits_of(x) & 0x80000000u));
    return a < 0.625f ? approx_tanh_small(x) : large;
}

/* sign(x) as torch.sign: -1, +1, and +0 for either zero */
static inline float sign_of(float x)
{
    return (float)((x > 0.0f) - (x < 0.0f));
}

/* |p - bound| beyond this cannot be an approximation error (CANDIDATE_MARGIN) */
static inline float margin(float p, float bound)
{
    return (fabsf(p) + fabsf(bound)) * CANDIDATE_MARGIN + CANDIDATE_FLOOR_ABS;
}

static int64_t gather_candidates(const float *x, const float *e, const float *w, const uint8_t *flags, int64_t count,
                                 int64_t flat0, int32_t *flat, float *tau, float *exp_arg, float *tanh_arg);

/* An upper bound of exp(e) * tanh(w) for e in [0, 80] and any w without a transcendental function
 * (within 7% of it for the small w of task vectors, 40% anywhere): exp(e) = 2^k 2^r (k = floor(e
 * log2 e), r in [0, 1)) is at most 2^k (1 + r) (2^r is convex: below its chord), and tanh(w) is at
 * most min(w, 1) for w >= 0 and negative below (bounded by 0). The rounding of e log2 e moves the
 * bound by under 2^-17 (relative), and torch's exp and tanh lie within a few ulps of the true
 * values: both far inside CANDIDATE_MARGIN. A NaN w gives 0. */
static inline float score_bound(float e, float w)
{
    const float y = e * 1.44269504088896341f;
    const float nearest = (y + 12582912.0f) - 12582912.0f; /* y in [0, 116): rounded to an integer */
    const float k = nearest > y ? nearest - 1.0f : nearest;  /* floor(y) */
    const float power = float_of((uint32_t)((int32_t)k + 127) << 23);
    const float t = w > 0.0f ? (w < 1.0f ? w : 1.0f) : 0.0f;
    return (power * (1.0f + (y - k))) * t;
}

/* The candidates of one chunk (count columns) of task row x, written from flat/tau/exp_arg/tanh_arg on
 * (the chunk's own slot range). A positive floor_: the entries whose score bound reaches floor_ -
 * margin, and those whose score is NaN (for a bracket: their exact scores give all its counts).
 * Otherwise, with the approximate score p: collection (ceiling_ NaN), the entries whose p reaches
 * floor_ - margin; bracket, those within the margin of [floor_, ceiling_] and of the chunk's
 * largest p (the exact maximum is among them), *above getting the others whose p exceeds the
 * ceiling (their exact score does too). Returns how many candidates. */
static int64_t chunk_candidates(const float *x, const float *total, int64_t count, float lo, float hi,
                                float span, float nf, float floor_, float ceiling_, int64_t *above, int64_t flat0,
                                float *restrict e, float *restrict w, float *restrict p, uint8_t *restrict flags,
                                int32_t *flat, float *tau, float *exp_arg, float *tanh_arg)
{
    for (int64_t j = 0; j < count; j++) {
        const float a = fabsf(x[j]);
        const float c = a < lo ? lo : (a > hi ? hi : a); /* torch.clamp(a, lo, hi), lo <= hi */
        const float normalized = (c - lo) / span;
        e[j] = (normalized * normalized) * nf;
        w[j] = x[j] * total[j];
    }
    const float f = floor_, ceiling = ceiling_;
    if (f > 0.0f) {
        /* A positive floor (the common case): every entry whose score may reach it (its upper bound
         * does), and those whose score is NaN (w NaN: a sum over tasks that overflows), are
         * candidates. In a bracket their exact scores then give every count, and the maximum (at or
         * above the floor, or NaN, in the pass that finds t) is among them. */
        for (int64_t j = 0; j < count; j++) {
            const float u = score_bound(e[j], w[j]);
            flags[j] = (u >= f - margin(u, f)) | (w[j] != w[j]);
        }
        return gather_candidates(x, e, w, flags, count, flat0, flat, tau, exp_arg, tanh_arg);
    }
    /* max |w| as bit patterns (a float max reduction does not vectorize); NaN orders above 0.625 */
    uint32_t largest = 0;
    for (int64_t j = 0; j < count; j++)
        largest = max_u32(largest, magnitude_bits(w[j]));
    if (largest < bits_of(0.625f)) /* the common case (task vectors are small): the polynomial alone */
        for (int64_t j = 0; j < count; j++)
            p[j] = approx_exp(e[j]) * approx_tanh_small(w[j]);
    else
        for (int64_t j = 0; j < count; j++)
            p[j] = approx_exp(e[j]) * approx_tanh(w[j]);
    if (ceiling != ceiling) { /* NaN: collection */
        for (int64_t j = 0; j < count; j++)
            flags[j] = p[j] >= f - margin(p[j], f);
    } else {
        float top = -INFINITY;
        for (int64_t j = 0; j < count; j++)
            top = p[j] > top ? p[j] : top;
        int64_t over = 0;
        for (int64_t j = 0; j < count; j++) {
            /* a NaN score (a sum over tasks that overflows) is a candidate: the exact max is then NaN */
            const uint8_t near = ((p[j] >= f - margin(p[j], f)) & (p[j] <= ceiling + margin(p[j], ceiling)))
                                 | (p[j] >= top - margin(p[j], top)) | (p[j] != p[j]);
            flags[j] = near;
            over += !near & (p[j] > ceiling);
        }
        *above += over;
    }
    return gather_candidates(x, e, w, flags, count, flat0, flat, tau, exp_arg, tanh_arg);
}

/* The flagged entries of a chunk (few: 8 flags skipped at a time) written in position order: flat
 * index flat0 + j, tau, and the arguments of exp and tanh. Returns how many. */
static int64_t gather_candidates(const float *x, const float *e, const float *w, const uint8_t *flags, int64_t count,
                                 int64_t flat0, int32_t *flat, float *tau, float *exp_arg, float *tanh_arg)
{
    int64_t k = 0, j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    /* 16 entries at a time: each output's flagged lanes compressed in a register, stored whole (the
     * lanes past k are overwritten later or lie in this chunk's unused slots: k <= j) */
    const __m512i step = _mm512_set1_epi32(16);
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)flat0),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (; j + 16 <= count; j += 16, index = _mm512_add_epi32(index, step)) {
        const __mmask16 keep = _mm_test_epi8_mask(_mm_loadu_si128((const __m128i *)(flags + j)),
                                                  _mm_set1_epi8(1));
        if (!keep)
            continue;
        _mm512_storeu_si512(flat + k, _mm512_maskz_compress_epi32(keep, index));
        _mm512_storeu_ps(tau + k, _mm512_maskz_compress_ps(keep, _mm512_loadu_ps(x + j)));
        _mm512_storeu_ps(exp_arg + k, _mm512_maskz_compress_ps(keep, _mm512_loadu_ps(e + j)));
        _mm512_storeu_ps(tanh_arg + k, _mm512_maskz_compress_ps(keep, _mm512_loadu_ps(w + j)));
        k += __builtin_popcount(keep);
    }
#endif
    for (; j + 8 <= count; j += 8) {
        uint64_t word;
        memcpy(&word, flags + j, 8);
        while (word) {
            const int64_t at = j + (__builtin_ctzll(word) >> 3);
            word &= word - 1;
            flat[k] = (int32_t)(flat0 + at);
            tau[k] = x[at];
            exp_arg[k] = e[at];
            tanh_arg[k] = w[at];
            k++;
        }
    }
    for (; j < count; j++)
        if (flags[j]) {
            flat[k] = (int32_t)(flat0 + j);
            tau[k] = x[j];
            exp_arg[k] = e[j];
            tanh_arg[k] = w[j];
            k++;
        }
    return k;
}

/* Ask for the inputs of the chunk at column j (raw[0 .. n]) ahead of its use: n + 1 streams of a
 * few KiB each, which the hardware prefetcher finds only after their first misses. */
static inline void prefetch_chunk(const void *const *raw, const int32_t *raw_dtypes, int64_t n, int64_t j)
{
    for (int64_t r = 0; r <= n; r++) {
        const int64_t size = raw_dtypes[r] == F32 ? 4 : 2;
        const char *start = (const char *)raw[r] + j * size;
        for (int64_t b = 0; b < PCB_CHUNK * size; b += 64)
            __builtin_prefetch(start + b);
    }
}

/* The candidates of a block [n, m] (row i at tv + i * stride; n * m < 2^31) for PCB official with
 * inter "sum" (normalized == 0) or "normalized_sum" (see chunk_candidates; ``ceiling`` NULL: the
 * collection at floor_, else the bracket [floor_, ceiling], above[i] adding task i's entries known
 * to lie above it), task-major in position order, with their flat index i * m + j, tau, and the
 * arguments of exp and tanh. With ``raw`` (else NULL), tau is formed here from the stored slices
 * raw[0] (the base) and raw[1 + i] (model i), m entries each of dtype raw_dtypes[.] (F32, BF16,
 * F16): f32(model) - f32(base), the bits of torch.sub; tv and stride are then unused. Outputs hold
 * n * m entries; counts[i] gets task i's number. Returns the total, or -1 when scratch memory
 * could not be had. */
int64_t pcb_candidates(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                       const int32_t *raw_dtypes, const float *lo, const float *hi, const float *span, float nf,
                       int normalized, const float *floor_, const float *ceiling, int64_t *above, int64_t *counts,
                       int32_t *flat, float *tau, float *exp_arg, float *tanh_arg, int threads)
{
    (void)threads;
    const int64_t chunks = (m + PCB_CHUNK - 1) / PCB_CHUNK;
    int64_t *chunk_counts = calloc((size_t)(n * chunks > 0 ? 3 * n * chunks : 1), sizeof(int64_t));
    if (chunk_counts == NULL)
        return -1;
    int64_t *chunk_above = chunk_counts + n * chunks, *chunk_slots = chunk_counts + 2 * n * chunks;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* total, e, w, p, flags; normalized_sum: n rows of sign(x) * N; raw: the base and n rows of tau */
        const int64_t floats = (5 + (normalized ? n : 0) + (raw != NULL ? n + 1 : 0)) * PCB_CHUNK;
        const size_t rows = (size_t)n * (sizeof(const float *) + sizeof(int64_t)); /* row and written */
        float *scratch = malloc((size_t)floats * sizeof(float) + rows);
        if (scratch == NULL) {
            failed = 1;
        } else {
            float *total = scratch, *e = scratch + PCB_CHUNK, *w = e + PCB_CHUNK, *p = w + PCB_CHUNK;
            uint8_t *flags = (uint8_t *)(p + PCB_CHUNK);
            float *signed_ = p + 2 * PCB_CHUNK; /* normalized_sum: sign(x) * N per task */
            float *formed = signed_ + (normalized ? n : 0) * PCB_CHUNK; /* raw: the base, then the rows */
            const float **row = (const float **)(scratch + floats); /* this chunk's row of each task */
            /* Each thread's chunks are one run (a static schedule); task i's candidates of the run are
             * written one after the other from the run's first slot, each chunk's within its own
             * range (its first slot lies at or before the chunk's first column) */
            int64_t *written = (int64_t *)(row + n), first_chunk = -1;
#pragma omp for schedule(static)
            for (int64_t c = 0; c < chunks; c++) {
                if (first_chunk < 0) {
                    first_chunk = c;
                    for (int64_t i = 0; i < n; i++)
                        written[i] = 0;
                }
                const int64_t j0 = c * PCB_CHUNK, count = m - j0 < PCB_CHUNK ? m - j0 : PCB_CHUNK;
                if (raw != NULL) {
                    if (j0 + 2 * PCB_CHUNK <= m)
                        prefetch_chunk(raw, raw_dtypes, n, j0 + PCB_CHUNK);
                    load_f32(raw[0], raw_dtypes[0], j0, count, formed);
                    for (int64_t i = 0; i < n; i++) {
                        float *x = formed + (i + 1) * PCB_CHUNK;
                        load_f32(raw[1 + i], raw_dtypes[1 + i], j0, count, x);
                        for (int64_t j = 0; j < count; j++)
                            x[j] = x[j] - formed[j];
                        row[i] = x;
                    }
                } else {
                    for (int64_t i = 0; i < n; i++)
                        row[i] = tv + i * stride + j0;
                }
                if (!normalized) {
                    /* total = x_0 + x_1 + ... in task order (pcb_blocks.sum_rows_into) */
                    for (int64_t j = 0; j < count; j++)
                        total[j] = row[0][j];
                    for (int64_t i = 1; i < n; i++) {
                        const float *x = row[i];
                        for (int64_t j = 0; j < count; j++)
                            total[j] = total[j] + x[j];
                    }
                } else {
                    for (int64_t i = 0; i < n; i++) {
                        const float *x = row[i];
                        float *s = signed_ + i * PCB_CHUNK;
                        const float l = lo[i], h = hi[i], sp = span[i];
                        for (int64_t j = 0; j < count; j++) {
                            const float a = fabsf(x[j]);
                            const float cl = a < l ? l : (a > h ? h : a);
                            s[j] = sign_of(x[j]) * ((cl - l) / sp);
                        }
                    }
                    for (int64_t j = 0; j < count; j++)
                        total[j] = signed_[j];
                    for (int64_t i = 1; i < n; i++)
                        for (int64_t j = 0; j < count; j++)
                            total[j] = total[j] + signed_[i * PCB_CHUNK + j];
                }
                for (int64_t i = 0; i < n; i++) {
                    const int64_t slot = i * m + first_chunk * PCB_CHUNK + written[i];
                    const int64_t found = chunk_candidates(
                        row[i], total, count, lo[i], hi[i], span[i], nf, floor_[i],
                        ceiling == NULL ? NAN : ceiling[i], chunk_above + i * chunks + c, i * m + j0, e, w, p, flags,
                        flat + slot, tau + slot, exp_arg + slot, tanh_arg + slot);
                    chunk_counts[i * chunks + c] = found;
                    chunk_slots[i * chunks + c] = slot;
                    written[i] += found;
                }
            }
        }
        free(scratch);
    }
    if (failed) {
        free(chunk_counts);
        return -1;
    }
    /* pack the runs, task-major: every destination lies at or before its source */
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        counts[i] = 0;
        if (above != NULL)
            for (int64_t c = 0; c < chunks; c++)
                above[i] += chunk_above[i * chunks + c];
        for (int64_t c = 0; c < chunks;) {
            /* the chunks whose candidates lie one after the other (a thread's run) in one move */
            const int64_t source = chunk_slots[i * chunks + c];
            int64_t size = 0;
            do
                size += chunk_counts[i * chunks + c++];
            while (c < chunks && chunk_slots[i * chunks + c] == source + size);
            if (size && source != k) {
                memmove(flat + k, flat + source, (size_t)size * sizeof(int32_t));
                memmove(tau + k, tau + source, (size_t)size * sizeof(float));
                memmove(exp_arg + k, exp_arg + source, (size_t)size * sizeof(float));
                memmove(tanh_arg + k, tanh_arg + source, (size_t)size * sizeof(float));
            }
            k += size;
            counts[i] += size;
        }
    }
    free(chunk_counts);
    return k;
}

/* Keep, in place, the candidates whose exact score reaches their task's floor (score >= floor_[i];
 * counts[i] entries of task i, task-major); counts become the kept numbers. Returns the total kept. */
int64_t pcb_keep(int64_t n, int64_t *counts, int32_t *flat, float *score, float *tau, const float *floor_)
{
    int64_t read = 0, write = 0;
    for (int64_t i = 0; i < n; i++) {
        const float f = floor_[i];
        const int64_t end = read + counts[i], first = write;
        for (; read < end; read++) {
            flat[write] = flat[read];
            score[write] = score[read];
            tau[write] = tau[read];
            write += score[read] >= f;
        }
        counts[i] = write - first;
    }
    return write;
}

/* PCB's merge of a block's collected entries (task-major, offsets[i] .. offsets[i + 1] for task i,
 * flat index i * m + position): out[j] = sum_i v_i / max(sum_i s_i, 1e-12) over the entries at
 * position j, s_i = max(score - t_i, 0) / keep_span_i, v_i = ((sign(tau) * clamp(|tau|, lo_i, hi_i))
 * * s_i) [* lam_i], the sums in task order from +0 (pcb.py's merge through core.engine.Entries).
 * ``den``: m floats of scratch. */
void pcb_merge_entries(int64_t n, int64_t m, const int64_t *offsets, const int32_t *flat, const float *score,
                       const float *tau, const float *t, const float *keep_span, const float *lo, const float *hi,
                       const float *lam, float *out, float *den)
{
    for (int64_t j = 0; j < m; j++) {
        out[j] = 0.0f;
        den[j] = 0.0f;
    }
    /* each run of entries: weights and values in a loop that vectorizes, then added at their
     * positions (unique within a task: the sums stay in task order) */
    float weight[PCB_CHUNK], value[PCB_CHUNK];
    for (int64_t i = 0; i < n; i++) {
        const float ti = t[i], span = keep_span[i], l = lo[i], h = hi[i];
        const int64_t base = i * m;
        for (int64_t k0 = offsets[i]; k0 < offsets[i + 1]; k0 += PCB_CHUNK) {
            const int64_t count = offsets[i + 1] - k0 < PCB_CHUNK ? offsets[i + 1] - k0 : PCB_CHUNK;
            const float *sc = score + k0, *x = tau + k0;
            for (int64_t c = 0; c < count; c++) {
                float s = sc[c] - ti;
                s = s < 0.0f ? 0.0f : s;
                s = s / span;
                const float a = fabsf(x[c]);
                weight[c] = s;
                value[c] = (sign_of(x[c]) * (a < l ? l : (a > h ? h : a))) * s;
            }
            if (lam != NULL) {
                const float li = lam[i];
                for (int64_t c = 0; c < count; c++)
                    value[c] = value[c] * li;
            }
            const int32_t *at = flat + k0;
            for (int64_t c = 0; c < count; c++) {
                const int64_t j = at[c] - base;
                out[j] = out[j] + value[c];
                den[j] = den[j] + weight[c];
            }
        }
    }
    const float smallest = 1e-12f;
    for (int64_t j = 0; j < m; j++)
        out[j] = out[j] / (den[j] < smallest ? smallest : den[j]);
}

/* The approximations of the candidate test, for the tests: exp_out[j] = approx_exp(x[j]),
 * tanh_out[j] = approx_tanh(x[j]). */
void pcb_approximations(int64_t count, const float *x, float *exp_out, float *tanh_out)
{
    for (int64_t j = 0; j < count; j++) {
        exp_out[j] = approx_exp(x[j]);
        tanh_out[j] = approx_tanh(x[j]);
    }
}

/* tau of a block's collected entries (task-major, offsets[i] .. offsets[i + 1] for task i, flat index
 * i * m + j) from its stored slices raw[0] (the base) and raw[1 + i] (model i): out[k] =
 * f32(model_i[j]) - f32(base[j]), the bits of torch.sub (pcb_candidates' raw input). */
void pcb_gather_tau(int64_t n, int64_t m, const void *const *raw, const int32_t *raw_dtypes, const int64_t *offsets,
                    const int32_t *flat, float *out)
{
    const void *base = raw[0];
    const int base_dtype = raw_dtypes[0];
    for (int64_t i = 0; i < n; i++) {
        const void *model = raw[1 + i];
        const int dtype = raw_dtypes[1 + i];
        const int64_t first = i * m;
        for (int64_t k = offsets[i]; k < offsets[i + 1]; k++) {
            const int64_t j = flat[k] - first;
            out[k] = f32_at(model, dtype, j) - f32_at(base, base_dtype, j);
        }
    }
}

/* The upper bounds of the candidate test, for the tests: out[j] = score_bound(e[j], w[j]). */
void pcb_score_bounds(int64_t count, const float *e, const float *w, float *out)
{
    for (int64_t j = 0; j < count; j++)
        out[j] = score_bound(e[j], w[j]);
}

/* The exact scores of a block's bracket candidates (task-major, counts[i] of task i) counted around
 * [floor_, ceiling] as core.engine.select_in_bracket's pass wants them: above, at_ceiling, at_floor
 * and peak (the max, NaN if any is NaN) accumulate per task; the scores strictly inside go to inside, in order
 * (inside_counts[i] of task i). */
void pcb_bracket_counts(int64_t n, const int64_t *counts, const float *score, const float *floor_,
                        const float *ceiling, int64_t *above, int64_t *at_ceiling, int64_t *at_floor, float *peak,
                        float *inside, int64_t *inside_counts)
{
    int64_t read = 0, write = 0;
    for (int64_t i = 0; i < n; i++) {
        const float f = floor_[i], c = ceiling[i];
        const int64_t first = write, end = read + counts[i];
        float top = peak[i];
        for (; read < end; read++) {
            const float s = score[read];
            above[i] += s > c;
            at_ceiling[i] += s == c;
            at_floor[i] += s == f;
            top = s > top || s != s ? s : top; /* NaN propagates, as torch.amax */
            inside[write] = s;
            write += (s > f) & (s < c);
        }
        peak[i] = top;
        inside_counts[i] = write - first;
    }
}

/* PCB's clip pass (docs/design.md 2.2 step 1) in one sweep per block: the exact lo_i and hi_i are
 * order statistics of |tau_i| near both ends of the row (core.select.TailSelect's task). Each task
 * keeps two sets of keys (uint32): its smallest |tau| (key: the bit pattern, in which non-negative
 * floats and NaN have a total order) and its largest (key: 0x7FFFFFFF minus the bit pattern). A
 * set of capacity 2k takes every key below its bound; when full, it keeps its k smallest keys and
 * its bound becomes the k-th (select_smallest). A key left out lies at or above the bound of its
 * time, and bounds only fall: the k smallest keys of the row are in the set at the end, exactly. */

/* Moves the k smallest of v[0, size) to v[0, k), the k-th smallest at v[k - 1] (1 <= k <= size), in
 * time linear whatever the keys: the k-th smallest by two counting passes over 16 bits each
 * (``counts``: 65536 entries of scratch), then the keys below it moved to the front and after them
 * as many keys equal to it as the k take. */
static void select_smallest(uint32_t *v, int64_t size, int64_t k, int64_t *counts)
{
    int64_t need = k; /* how many keys, from the smallest of the digit's group, reach the k-th */
    uint32_t high = 0;
    for (int pass = 0; pass < 2; pass++) {
        memset(counts, 0, 65536 * sizeof(int64_t));
        for (int64_t i = 0; i < size; i++)
            if (pass == 0 || (v[i] >> 16) == high)
                counts[pass == 0 ? v[i] >> 16 : v[i] & 0xFFFFu]++;
        uint32_t digit = 0;
        while (counts[digit] < need)
            need -= counts[digit++];
        high = pass == 0 ? digit : (high << 16) | digit; /* after the second pass: the k-th key */
    }
    int64_t front = 0;
    for (int64_t i = 0; i < size; i++)
        if (v[i] < high) {
            const uint32_t swap = v[front];
            v[front++] = v[i];
            v[i] = swap;
        }
    for (int64_t i = front; i < size && front < k; i++)
        if (v[i] == high) {
            const uint32_t swap = v[front];
            v[front++] = v[i];
            v[i] = swap;
        }
}

/* Add key to a set (capacity 2k, *size keys, bound *bound); a full set keeps its k smallest. Returns
 * nonzero where the scratch of the selection could not be had. */
static inline int set_add(uint32_t *set, int64_t *size, int64_t *bound, int64_t k, uint32_t key)
{
    if ((int64_t)key >= *bound)
        return 0;
    set[(*size)++] = key;
    if (*size == 2 * k) {
        int64_t *counts = malloc(65536 * sizeof(int64_t));
        if (counts == NULL)
            return 1;
        select_smallest(set, *size, k, counts);
        free(counts);
        *size = k;
        *bound = set[k - 1];
    }
    return 0;
}

/* One block [n, m] of the clip pass: row i at tv + i * stride, or (``raw``, else NULL) formed from the
 * stored slices as pcb_candidates does (the bits of torch.sub). For each task: the keys of its
 * |tau| join its two sets (low: sets[0] + i * 2 k_low, high: sets[1] + i * 2 k_high; sizes [2, n],
 * bounds [2, n], a bound of 2^31 or more taking every key); row_max[i] = max |tau| (NaN if any
 * is NaN, as torch.amax); and the sample columns first, first + step, ... (< m) of tau go to
 * sample[i * columns + c]. */
int pcb_clip_tails(const float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw,
                   const int32_t *raw_dtypes, int64_t k_low, int64_t k_high, uint32_t *low_sets,
                   uint32_t *high_sets, int64_t *sizes, int64_t *bounds, int64_t first, int64_t step,
                   int64_t columns, float *sample, float *row_max, int threads)
{
    (void)threads;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
    for (int64_t i = 0; i < n; i++) {
        float base[PCB_CHUNK], formed[PCB_CHUNK];
        uint32_t *low = low_sets + i * 2 * k_low, *high = high_sets + i * 2 * k_high;
        int64_t *low_size = sizes + i, *high_size = sizes + n + i;
        int64_t *low_bound = bounds + i, *high_bound = bounds + n + i;
        uint32_t largest = 0;
        int64_t next = first, c = 0; /* the next sample column, and its index */
        for (int64_t j0 = 0; j0 < m; j0 += PCB_CHUNK) {
            const int64_t count = m - j0 < PCB_CHUNK ? m - j0 : PCB_CHUNK;
            const float *x = formed;
            if (raw != NULL) {
                load_f32(raw[0], raw_dtypes[0], j0, count, base);
                load_f32(raw[1 + i], raw_dtypes[1 + i], j0, count, formed);
                for (int64_t j = 0; j < count; j++)
                    formed[j] = formed[j] - base[j];
            } else {
                x = tv + i * stride + j0;
            }
            for (; next < j0 + count; next += step)
                sample[i * columns + c++] = x[next - j0];
            /* the chunk's smallest and largest |tau|: most chunks reach past neither bound */
            uint32_t smallest = 0xFFFFFFFFu, top = 0;
            for (int64_t j = 0; j < count; j++) {
                const uint32_t a = magnitude_bits(x[j]);
                smallest = a < smallest ? a : smallest;
                top = max_u32(top, a);
            }
            largest = max_u32(largest, top);
            /* keys below a bound: low, |tau| < bound; high, 0x7FFFFFFF - |tau| < bound */
            if ((int64_t)smallest < *low_bound || (int64_t)(0x7FFFFFFFu - top) < *high_bound)
                for (int64_t j = 0; j < count; j++) {
                    const uint32_t a = magnitude_bits(x[j]);
                    failed |= set_add(low, low_size, low_bound, k_low, a);
                    failed |= set_add(high, high_size, high_bound, k_high, 0x7FFFFFFFu - a);
                }
        }
        row_max[i] = float_of(largest);
    }
    return failed;
}

/* The k-th smallest key of each task's set (sets: n sets of capacity 2 k, sizes[i] keys, reordered
 * in place) into out[i]. Returns nonzero where scratch memory could not be had. */
int pcb_tail_values(int64_t n, uint32_t *sets, const int64_t *sizes, int64_t k, uint32_t *out)
{
    int64_t *counts = malloc(65536 * sizeof(int64_t));
    if (counts == NULL)
        return 1;
    for (int64_t i = 0; i < n; i++) {
        uint32_t *set = sets + i * 2 * k;
        select_smallest(set, sizes[i], k, counts);
        out[i] = set[k - 1];
    }
    free(counts);
    return 0;
}

/* Selection helpers of the engine in C. The collection of core.engine.collect_block: the entries of a [n, m] block whose score is at
 * least their task's floor, with their flat index (task * m + position), score and task-vector
 * value, task-major and in position order (what torch's nonzero and take give). Pure data movement:
 * the same values. Two calls: the counts per task (to size the outputs), then the copy. */
#include "native.h"

/* counts[i] = entries of row i with score >= floor[i] (NaN scores are not). */
void collect_counts(const float *scores, int64_t n, int64_t m, int64_t score_stride, const float *floor_,
                    int64_t *counts, int threads)
{
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *s = scores + i * score_stride;
        const float f = floor_[i];
        int64_t count = 0;
        for (int64_t j = 0; j < m; j++)
            count += s[j] >= f;
        counts[i] = count;
    }
}

/* Row i's entries go to outputs [offsets[i], offsets[i + 1]) (offsets: n + 1 running sums of
 * collect_counts). Each position is written at the row's next free slot and kept by advancing it; the
 * loop stops once the row's last entry is written, so no slot of another row is touched. */
void collect_entries(const float *scores, const float *tv, int64_t n, int64_t m, int64_t score_stride,
                     int64_t tv_stride, const float *floor_, const int64_t *offsets, int32_t *flat,
                     float *out_scores, float *out_tau, int threads)
{
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *s = scores + i * score_stride, *x = tv + i * tv_stride;
        const float f = floor_[i];
        int64_t k = offsets[i];
        const int64_t end = offsets[i + 1];
        for (int64_t j = 0; j < m && k < end; j++) {
            flat[k] = (int32_t)(i * m + j);
            out_scores[k] = s[j];
            out_tau[k] = x[j];
            k += s[j] >= f;
        }
    }
}

/* For each task row of a block: the min and max of |x| over each run of ``run`` entries (the first
 * runs * run entries; [n, runs] each) and max |x| over the whole row (NaN if any is NaN, as
 * torch.amax): PCB's clip pass (core.select.TailSelect) without forming |x|. Exact. With ``raw``
 * (else NULL), the rows are first formed into tv from the stored slices raw[0] (the base) and
 * raw[1 + i] (model i) of dtypes raw_dtypes: f32(model) - f32(base), the bits of torch.sub. */
void run_extremes(float *tv, int64_t n, int64_t m, int64_t stride, const void *const *raw, const int32_t *raw_dtypes,
                  int64_t run, float *run_min, float *run_max, float *row_max, int threads)
{
    (void)threads;
    const int64_t runs = m / run;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *x = tv + i * stride;
        if (raw != NULL) {
            float base[1024];
            for (int64_t j0 = 0; j0 < m; j0 += 1024) {
                const int64_t count = m - j0 < 1024 ? m - j0 : 1024;
                load_f32(raw[0], raw_dtypes[0], j0, count, base);
                load_f32(raw[1 + i], raw_dtypes[1 + i], j0, count, x + j0);
                for (int64_t j = 0; j < count; j++)
                    x[j0 + j] = x[j0 + j] - base[j];
            }
        }
        uint32_t whole = 0;
        for (int64_t r = 0; r < runs; r++) {
            uint32_t lo = 0xFFFFFFFFu, hi = 0;
            for (int64_t j = r * run; j < (r + 1) * run; j++) {
                const uint32_t a = magnitude_bits(x[j]);
                lo = a < lo ? a : lo;
                hi = a > hi ? a : hi;
            }
            run_min[i * runs + r] = float_of(lo);
            run_max[i * runs + r] = float_of(hi);
            whole = hi > whole ? hi : whole;
        }
        for (int64_t j = runs * run; j < m; j++) {
            const uint32_t a = magnitude_bits(x[j]);
            whole = a > whole ? a : whole;
        }
        row_max[i] = float_of(whole);
    }
}

/* The collected scores of one block (task-major, counts[i] of task i) split around a ceiling per
 * task: above[i] += how many exceed top[i], maxima[i] = max(maxima[i], their max), and the scores
 * at or below top[i] copied in order to below (task-major, below_counts[i] of task i). Scores are
 * finite (the engine checks its inputs). */
void collected_split(int64_t n, const int64_t *counts, const float *score, const float *top, int64_t *above,
                     float *maxima, float *below, int64_t *below_counts)
{
    int64_t read = 0, write = 0;
    for (int64_t i = 0; i < n; i++) {
        const float t = top[i];
        float mx = maxima[i];
        int64_t over = 0;
        const int64_t first = write, end = read + counts[i];
        for (; read < end; read++) {
            const float s = score[read];
            mx = s > mx ? s : mx;
            over += s > t;
            below[write] = s;
            write += s <= t;
        }
        maxima[i] = mx;
        above[i] += over;
        below_counts[i] = write - first;
    }
}

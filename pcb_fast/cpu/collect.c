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

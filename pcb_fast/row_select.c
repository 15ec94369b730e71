/* Per-row order statistics of |x| by radix select; built and called by pcb_fast/native.py.

For x >= 0 the bits of a float32 read as an unsigned integer are in the order of the values
(+0 lowest, +inf below NaN), so |x| is ranked exactly by its bits with the sign cleared. A
histogram of the top 11 of those 31 bits places each wanted rank in one bucket; the bucket's
members (a few percent of a row of real weights) are gathered and refined by the next 11 bits,
then by the last 9, which leaves the exact bits of the value at that rank. A row is read twice,
from cache. On the rows of benchmarks/bench_methods.py (8 x 4096 rows of 4096, ranks 40 and 448,
2 cores) this takes 0.11 s where torch's abs, partial top-k and kthvalue take 0.81 s. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ABS_BITS 0x7fffffffu
#define TOP_SHIFT 20
#define TOP_BINS 2048u

static const int SHIFT[3] = {TOP_SHIFT, 9, 0};
static const int WIDTH[3] = {11, 11, 9};

/* The bucket, scanning from the largest, that holds descending rank *rank (0-based) of a
   histogram of `bins` buckets; *rank becomes the rank inside that bucket. */
static uint32_t find_bucket(const uint32_t *hist, uint32_t bins, int64_t *rank)
{
    int64_t r = *rank;
    uint32_t b = bins - 1;
    while (b > 0 && r >= (int64_t)hist[b]) {
        r -= hist[b];
        b--;
    }
    *rank = r;
    return b;
}

/* The key at descending rank `rank` among `count` keys that agree on all digits above `level`
   (their common value so far in `prefix`). Compacts `keys` in place. */
static uint32_t refine(uint32_t *keys, int64_t count, int64_t rank, int level, uint32_t prefix)
{
    uint32_t hist[TOP_BINS];
    for (;; level++) {
        const int shift = SHIFT[level];
        const uint32_t bins = 1u << WIDTH[level], mask = bins - 1;
        memset(hist, 0, bins * sizeof(uint32_t));
        for (int64_t i = 0; i < count; i++)
            hist[(keys[i] >> shift) & mask]++;
        const uint32_t bucket = find_bucket(hist, bins, &rank);
        prefix |= bucket << shift;
        if (level == 2)
            return prefix;
        int64_t kept = 0;
        for (int64_t i = 0; i < count; i++) {
            const uint32_t key = keys[i];
            keys[kept] = key; /* branch-free compaction: kept <= i */
            kept += ((key >> shift) & mask) == bucket;
        }
        count = kept;
    }
}

static float from_bits(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static int select_rows(const uint32_t *bits, int64_t first, int64_t last, int64_t rows_per_group,
                       int64_t group_stride, int64_t length, int64_t rank_a, int64_t rank_b,
                       float *out_a, float *out_b)
{
    uint32_t *gathered = malloc(2 * (size_t)length * sizeof(uint32_t));
    if (gathered == NULL)
        return -1;
    uint32_t *keys_a = gathered, *keys_b = gathered + length;
    /* Two interleaved histograms: consecutive entries often share a bucket, and one counter
       would serialise their increments. */
    uint32_t hist[2][TOP_BINS], merged[TOP_BINS];
    for (int64_t q = first; q < last; q++) {
        const uint32_t *x = bits + (q / rows_per_group) * group_stride + (q % rows_per_group) * length;
        memset(hist, 0, sizeof hist);
        int64_t i = 0;
        for (; i + 1 < length; i += 2) {
            hist[0][(x[i] & ABS_BITS) >> TOP_SHIFT]++;
            hist[1][(x[i + 1] & ABS_BITS) >> TOP_SHIFT]++;
        }
        if (i < length)
            hist[0][(x[i] & ABS_BITS) >> TOP_SHIFT]++;
        for (uint32_t b = 0; b < TOP_BINS; b++)
            merged[b] = hist[0][b] + hist[1][b];
        int64_t rank_in_a = rank_a, rank_in_b = rank_b;
        const uint32_t bucket_a = find_bucket(merged, TOP_BINS, &rank_in_a);
        const uint32_t bucket_b = find_bucket(merged, TOP_BINS, &rank_in_b);
        int64_t count_a = 0, count_b = 0;
        for (i = 0; i < length; i++) {
            const uint32_t key = x[i] & ABS_BITS, top = key >> TOP_SHIFT;
            keys_a[count_a] = key;
            count_a += top == bucket_a;
            keys_b[count_b] = key;
            count_b += top == bucket_b;
        }
        out_a[q] = from_bits(refine(keys_a, count_a, rank_in_a, 1, bucket_a << TOP_SHIFT));
        out_b[q] = from_bits(refine(keys_b, count_b, rank_in_b, 1, bucket_b << TOP_SHIFT));
    }
    free(gathered);
    return 0;
}

/* `rows` rows, in groups of `rows_per_group` rows of `length` float32 entries (read as bits):
   row q starts at bits + (q / rows_per_group) * group_stride + (q % rows_per_group) * length.
   Writes the |x| at descending ranks rank_a and rank_b (0 <= each < length) of row q into
   out_a[q] and out_b[q], on `threads` OpenMP threads (torch's own team: the library is linked
   to the libgomp torch loaded, whose idle workers would otherwise spin against ours). Returns 0,
   or -1 when scratch memory cannot be had. */
int row_order_statistics(const uint32_t *bits, int64_t rows, int64_t rows_per_group,
                         int64_t group_stride, int64_t length, int64_t rank_a, int64_t rank_b,
                         float *out_a, float *out_b, int threads)
{
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t share = 0, shares = 1;
#ifdef _OPENMP
        share = omp_get_thread_num();
        shares = omp_get_num_threads();
#endif
        failed |= select_rows(bits, rows * share / shares, rows * (share + 1) / shares, rows_per_group,
                              group_stride, length, rank_a, rank_b, out_a, out_b) != 0;
    }
    return failed ? -1 : 0;
}

/* Per-row order statistics of |x| by radix select; built and called by pcb_fast/native.py.

For x >= 0 the bits of a float32 read as an unsigned integer are in the order of the values
(+0 lowest, +inf below NaN), so |x| is ranked exactly by its bits with the sign cleared. A
histogram of the top bits (up to 11 of the 31, fewer for shorter rows) places each wanted rank
in one bucket; the bucket's members (a few percent of a row of real weights) are gathered and
refined by the next 11 bits, and so on, until few are left and a quickselect finishes. A row is
read twice, from cache. Rows of up to SHORT_ROW entries go to the quickselect directly
(docs/benchmarks.md compares it with torch's abs, partial top-k and kthvalue). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "native.h"

#define ABS_BITS 0x7fffffffu
#define KEY_BITS 31
#define MAX_DIGIT 11
#define MAX_BINS (1u << MAX_DIGIT)
#define FEW 48 /* candidates from which a quickselect costs less than one more histogram */
#define SHORT_ROW 32 /* rows of up to this many entries: quickselect (a histogram costs more) */

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

/* The key at descending rank `rank` of keys[0..count) by quickselect (Hoare partitions around a
   median of three): for short rows and few candidates, where a histogram costs more than the
   keys. On return keys[0..rank) are all >= it. */
static uint32_t quickselect(uint32_t *keys, int64_t count, int64_t rank)
{
    int64_t lo = 0, hi = count - 1;
    while (hi - lo >= 16) {
        uint32_t a = keys[lo], b = keys[lo + (hi - lo) / 2], c = keys[hi];
        const uint32_t pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (keys[i] > pivot)
                i++;
            while (keys[j] < pivot)
                j--;
            if (i <= j) {
                const uint32_t swap = keys[i];
                keys[i++] = keys[j];
                keys[j--] = swap;
            }
        }
        /* keys[lo..j] >= pivot >= keys[i..hi]; anything between equals the pivot */
        if (rank <= j)
            hi = j;
        else if (rank >= i)
            lo = i;
        else
            return pivot;
    }
    for (int64_t i = lo + 1; i <= hi; i++) { /* insertion sort, descending */
        const uint32_t key = keys[i];
        int64_t j = i - 1;
        while (j >= lo && keys[j] < key) {
            keys[j + 1] = keys[j];
            j--;
        }
        keys[j + 1] = key;
    }
    return keys[rank];
}

/* The key at descending rank `rank` among `count` keys that agree on their bits above `shift`
   (those bits in `prefix`). Compacts `keys` in place. */
static uint32_t refine(uint32_t *keys, int64_t count, int64_t rank, int shift, uint32_t prefix)
{
    uint32_t hist[MAX_BINS];
    while (shift > 0) {
        if (count <= FEW)
            return quickselect(keys, count, rank);
        const int width = shift < MAX_DIGIT ? shift : MAX_DIGIT;
        shift -= width;
        const uint32_t bins = 1u << width, mask = bins - 1;
        memset(hist, 0, bins * sizeof(uint32_t));
        for (int64_t i = 0; i < count; i++)
            hist[(keys[i] >> shift) & mask]++;
        const uint32_t bucket = find_bucket(hist, bins, &rank);
        prefix |= bucket << shift;
        int64_t kept = 0;
        for (int64_t i = 0; i < count; i++) {
            const uint32_t key = keys[i];
            keys[kept] = key; /* branch-free compaction: kept <= i */
            kept += ((key >> shift) & mask) == bucket;
        }
        count = kept;
    }
    return prefix;
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
    uint32_t hist[2][MAX_BINS], merged[MAX_BINS];
    /* at least four entries per bucket of the top digit: the histogram costs less than the row */
    int width = 1;
    while (width < MAX_DIGIT && ((int64_t)4 << width) <= length)
        width++;
    const int top_shift = KEY_BITS - width;
    const uint32_t top_bins = 1u << width;
    for (int64_t q = first; q < last; q++) {
        const uint32_t *x = bits + (q / rows_per_group) * group_stride + (q % rows_per_group) * length;
        if (length <= SHORT_ROW) {
            /* the larger rank first: the smaller one is then among the keys before it */
            const int64_t low = rank_a < rank_b ? rank_a : rank_b, high = rank_a < rank_b ? rank_b : rank_a;
            for (int64_t i = 0; i < length; i++)
                keys_a[i] = x[i] & ABS_BITS;
            const float at_high = from_bits(quickselect(keys_a, length, high));
            const float at_low = low < high ? from_bits(quickselect(keys_a, high, low)) : at_high;
            out_a[q] = rank_a == low ? at_low : at_high;
            out_b[q] = rank_b == high ? at_high : at_low;
            continue;
        }
        memset(hist[0], 0, top_bins * sizeof(uint32_t));
        memset(hist[1], 0, top_bins * sizeof(uint32_t));
        int64_t i = 0;
        for (; i + 1 < length; i += 2) {
            hist[0][(x[i] & ABS_BITS) >> top_shift]++;
            hist[1][(x[i + 1] & ABS_BITS) >> top_shift]++;
        }
        if (i < length)
            hist[0][(x[i] & ABS_BITS) >> top_shift]++;
        for (uint32_t b = 0; b < top_bins; b++)
            merged[b] = hist[0][b] + hist[1][b];
        int64_t rank_in_a = rank_a, rank_in_b = rank_b;
        const uint32_t bucket_a = find_bucket(merged, top_bins, &rank_in_a);
        const uint32_t bucket_b = find_bucket(merged, top_bins, &rank_in_b);
        int64_t count_a = 0, count_b = 0;
        for (i = 0; i < length; i++) {
            const uint32_t key = x[i] & ABS_BITS, top = key >> top_shift;
            keys_a[count_a] = key;
            count_a += top == bucket_a;
            keys_b[count_b] = key;
            count_b += top == bucket_b;
        }
        out_a[q] = from_bits(refine(keys_a, count_a, rank_in_a, top_shift, bucket_a << top_shift));
        out_b[q] = from_bits(refine(keys_b, count_b, rank_in_b, top_shift, bucket_b << top_shift));
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

/* DARE's keep masks (docs/design.md 5.4): the counter-based hash of pcb_fast/core/rng.py, in
 * uint32 arithmetic. rng.py writes each round with int64 products of values below 2^32 by odd
 * constants below 2^31, masked to 32 bits: the same bits as these uint32 products modulo 2^32.
 * Entry j of a block starting at index lo, task i: x = mix(lo + j (low 32 bits) ^ stream_i),
 * x = mix(x ^ (lo + j) >> 32 ^ high_i), kept when x >> 8 >= threshold_i. Elementwise, so the
 * thread count changes nothing. */
#include "native.h"

/* Entries [first, last) of one task's row: 32-bit counters, so that the loop vectorizes; the
 * high word of the index is constant inside a run that does not cross a multiple of 2^32. */
static void keep_run(uint32_t start, int64_t count, uint32_t high_word, uint32_t stream, uint32_t high,
                     uint32_t threshold, uint8_t *restrict out)
{
    for (int64_t j = 0; j < count; j++) {
        uint32_t x = mix32((start + (uint32_t)j) ^ stream);
        x = mix32(x ^ high_word ^ high);
        out[j] = (x >> 8) >= threshold;
    }
}

void dare_keep_masks(int64_t lo, int64_t m, int64_t n, const uint32_t *streams, const uint32_t *highs,
                     const uint32_t *thresholds, uint8_t *out, int threads)
{
    (void)threads;
    const int64_t chunk = 16384;
    const int64_t chunks = (m + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n * chunks; c++) {
        int64_t i = c / chunks, j = (c % chunks) * chunk, end = j + chunk < m ? j + chunk : m;
        while (j < end) {  /* split where the index crosses a multiple of 2^32 */
            uint64_t index = (uint64_t)(lo + j);
            int64_t room = (int64_t)((((index >> 32) + 1) << 32) - index);
            int64_t count = end - j < room ? end - j : room;
            keep_run((uint32_t)index, count, (uint32_t)(index >> 32), streams[i], highs[i], thresholds[i],
                     out + i * m + j);
            j += count;
        }
    }
}

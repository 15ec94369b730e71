/* Task vectors from the stored inputs: the float32 block every torch-side pass of a merge from files
 * starts from. torch forms it with one mixed-dtype subtraction per model (bf16/fp16 converted on
 * the fly); this kernel does the same operations per entry in one sweep over a few KB at a time:
 *
 *   base32[j] = f32(base[j])                      (exact conversion)
 *   out[i][j] = f32(model_i[j]) - base32[j]       (exact conversion, one float32 subtraction)
 *
 * the bits of torch.sub(model_i, base32) (a - b, rounded once; +0 where they are equal). */
#include "native.h"

#define CHUNK 2048 /* entries per step: the base's chunk stays in L1 while every model reads it */

void task_vectors(int64_t n, int64_t m, const void *const *models, const int32_t *model_dtypes, const void *base,
                  int32_t base_dtype, float *base32, float *out, int64_t out_stride, int threads)
{
    (void)threads;
    const int64_t chunks = (m + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t start = c * CHUNK, count = m - start < CHUNK ? m - start : CHUNK;
        float *restrict b = base32 + start;
        load_f32(base, base_dtype, start, count, b);
        for (int64_t i = 0; i < n; i++) {
            float *restrict row = out + i * out_stride + start;
            load_f32(models[i], model_dtypes[i], start, count, row);
            for (int64_t j = 0; j < count; j++)
                row[j] = row[j] - b[j];
        }
    }
}

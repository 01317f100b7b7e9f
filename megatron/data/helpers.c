/* Compiled helpers for data index building (loaded with ctypes by megatron/data/helpers.py).
 *
 * Only sequential recurrences live here; everything that vectorises stays in numpy.
 * Built with -ffp-contract=off so the floating-point arithmetic matches the Python fallback
 * bit for bit (no fused multiply-add).
 */
#include <stdint.h>
#include <stdlib.h>

/* Megatron's greedy blending: for every output sample pick the dataset whose achieved count lags
 * its target the most (weights[i] * max(s, 1) - current[i]); ties go to the lowest index.
 * Returns 0 on success, -1 if the scratch allocation fails. */
int build_blending_indices(uint8_t *dataset_index, int64_t *dataset_sample_index,
                           const double *weights, int32_t num_datasets, int64_t size)
{
    int64_t *current = (int64_t *)calloc((size_t)(num_datasets > 0 ? num_datasets : 1),
                                         sizeof(int64_t));
    if (current == NULL)
        return -1;
    for (int64_t s = 0; s < size; ++s) {
        double sd = s > 1 ? (double)s : 1.0;
        int32_t best = 0;
        double best_error = weights[0] * sd - (double)current[0];
        for (int32_t i = 1; i < num_datasets; ++i) {
            double error = weights[i] * sd - (double)current[i];
            if (error > best_error) {
                best_error = error;
                best = i;
            }
        }
        dataset_index[s] = (uint8_t)best;
        dataset_sample_index[s] = current[best];
        current[best] += 1;
    }
    free(current);
    return 0;
}

/* sample_idx rows for samples 1..num_samples by one merge walk over the document lengths:
 * sample k ends at global token k * seq_length, stored as (position in doc_idx, offset) of the
 * non-empty document that contains that token. Same result as Megatron's build_sample_idx loop.
 * Row 0 is (0, 0). out has 2 * (num_samples + 1) int64 entries. Returns 0, or -1 if the
 * documents hold fewer tokens than required. */
int build_sample_idx(int64_t *out, const int32_t *sizes, const int32_t *doc_idx,
                     int64_t doc_idx_len, int64_t seq_length, int64_t num_samples)
{
    int64_t i = 0;          /* position in doc_idx */
    int64_t doc_start = 0;  /* global token index of the first token of doc_idx[i] */
    out[0] = 0;
    out[1] = 0;
    for (int64_t k = 1; k <= num_samples; ++k) {
        int64_t t = k * seq_length;
        for (;;) {
            if (i >= doc_idx_len)
                return -1;
            int64_t len = (int64_t)sizes[doc_idx[i]];
            if (t < doc_start + len)
                break;
            doc_start += len;
            ++i;
        }
        out[2 * k] = i;
        out[2 * k + 1] = t - doc_start;
    }
    return 0;
}

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

/* ---------------------------------------------------------------------------------------------
 * Mersenne Twister generators, bit-identical to C++'s std::mt19937 and std::mt19937_64 (the
 * generators Megatron's helpers.cpp uses for the BERT samples mapping). Seeding follows the
 * standard: state[0] = seed (mod 2^w), state[i] = f * (state[i-1] ^ (state[i-1] >> (w-2))) + i.
 */
#define MT32_N 624
#define MT32_M 397
#define MT64_N 312
#define MT64_M 156

typedef struct { uint32_t mt[MT32_N]; int32_t index; } mt32_state;
typedef struct { uint64_t mt[MT64_N]; int32_t index; } mt64_state;

static void mt32_seed(mt32_state *s, uint32_t seed)
{
    s->mt[0] = seed;
    for (int32_t i = 1; i < MT32_N; ++i)
        s->mt[i] = 1812433253u * (s->mt[i - 1] ^ (s->mt[i - 1] >> 30)) + (uint32_t)i;
    s->index = MT32_N;
}

static uint32_t mt32_next(mt32_state *s)
{
    if (s->index >= MT32_N) {
        for (int32_t i = 0; i < MT32_N; ++i) {
            uint32_t y = (s->mt[i] & 0x80000000u) | (s->mt[(i + 1) % MT32_N] & 0x7fffffffu);
            s->mt[i] = s->mt[(i + MT32_M) % MT32_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        s->index = 0;
    }
    uint32_t y = s->mt[s->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

static void mt64_seed(mt64_state *s, uint64_t seed)
{
    s->mt[0] = seed;
    for (int32_t i = 1; i < MT64_N; ++i)
        s->mt[i] = 6364136223846793005ull * (s->mt[i - 1] ^ (s->mt[i - 1] >> 62)) + (uint64_t)i;
    s->index = MT64_N;
}

static uint64_t mt64_next(mt64_state *s)
{
    if (s->index >= MT64_N) {
        for (int32_t i = 0; i < MT64_N; ++i) {
            uint64_t y = (s->mt[i] & 0xffffffff80000000ull)
                         | (s->mt[(i + 1) % MT64_N] & 0x7fffffffull);
            s->mt[i] = s->mt[(i + MT64_M) % MT64_N] ^ (y >> 1)
                       ^ ((y & 1ull) ? 0xb5026f5aa96619e9ull : 0ull);
        }
        s->index = 0;
    }
    uint64_t y = s->mt[s->index++];
    y ^= (y >> 29) & 0x5555555555555555ull;
    y ^= (y << 17) & 0x71d67fffeda60000ull;
    y ^= (y << 37) & 0xfff7eee000000000ull;
    y ^= y >> 43;
    return y;
}

/* The first n outputs of std::mt19937(seed) / std::mt19937_64(seed) (for tests). */
void mt19937_fill(uint32_t *out, int64_t n, uint32_t seed)
{
    mt32_state s;
    mt32_seed(&s, seed);
    for (int64_t i = 0; i < n; ++i)
        out[i] = mt32_next(&s);
}

void mt19937_64_fill(uint64_t *out, int64_t n, uint64_t seed)
{
    mt64_state s;
    mt64_seed(&s, seed);
    for (int64_t i = 0; i < n; ++i)
        out[i] = mt64_next(&s);
}

/* ---------------------------------------------------------------------------------------------
 * BERT samples mapping (Megatron's build_mapping): rows (first sentence, end sentence exclusive,
 * target length) cut from the documents [docs[d], docs[d+1]) of `sizes`.
 */
#define LONG_SENTENCE_LEN 512

/* Megatron's get_target_sample_len: one std::mt19937 draw unless short_seq_ratio is 0. */
static int32_t target_sample_len(int32_t short_seq_ratio, int32_t max_length, mt32_state *rng)
{
    if (short_seq_ratio == 0)
        return max_length;
    uint64_t r = (uint64_t)mt32_next(rng);
    if (r % (uint64_t)short_seq_ratio == 0)
        return (int32_t)(2 + r % (uint64_t)(max_length - 1));
    return max_length;
}

/* One pass of Megatron's two-pass build_mapping. With out == NULL only counts the samples
 * (and fills stats[0..2] = empty, one-sentence and long-sentence documents); otherwise writes
 * 3 values per sample into out (uint32 or, with out_is_64, uint64). Epochs stop once the
 * count reached max_num_samples (checked at the start of an epoch), or after an epoch that
 * produced no sample (Megatron would loop there until num_epochs). Returns the count. */
int64_t build_bert_mapping(void *out, int32_t out_is_64, const int64_t *docs, int64_t num_docs,
                           const int32_t *sizes, int32_t num_epochs, uint64_t max_num_samples,
                           int32_t max_seq_length, int32_t short_seq_ratio, int64_t seed,
                           int32_t min_num_sent, int64_t *stats)
{
    mt32_state rng;
    mt32_seed(&rng, (uint32_t)(uint64_t)seed);
    uint32_t *out32 = (uint32_t *)out;
    uint64_t *out64 = (uint64_t *)out;
    uint64_t map_index = 0;
    int64_t empty_docs = 0, one_sent_docs = 0, long_sent_docs = 0;

    for (int32_t epoch = 0; epoch < num_epochs; ++epoch) {
        if (map_index >= max_num_samples)
            break;
        uint64_t epoch_start = map_index;
        for (int64_t doc = 0; doc < num_docs; ++doc) {
            const int64_t first = docs[doc];
            const int64_t last = docs[doc + 1];
            int64_t prev_start = first;
            int64_t num_remain_sent = last - first;
            if (epoch == 0) {
                if (num_remain_sent == 0)
                    ++empty_docs;
                if (num_remain_sent == 1)
                    ++one_sent_docs;
            }
            int contains_long_sentence = 0;
            if (num_remain_sent > 1) {
                for (int64_t s = first; s < last; ++s) {
                    if (sizes[s] > LONG_SENTENCE_LEN) {
                        if (epoch == 0)
                            ++long_sent_docs;
                        contains_long_sentence = 1;
                        break;
                    }
                }
            }
            if (num_remain_sent < min_num_sent || contains_long_sentence)
                continue;
            int32_t seq_len = 0;
            int32_t num_sent = 0;
            int32_t target = target_sample_len(short_seq_ratio, max_seq_length, &rng);
            for (int64_t s = first; s < last; ++s) {
                seq_len += sizes[s];
                ++num_sent;
                --num_remain_sent;
                if ((seq_len >= target && num_remain_sent > 1 && num_sent >= min_num_sent)
                    || num_remain_sent == 0) {
                    if (out != NULL) {
                        if (out_is_64) {
                            out64[3 * map_index] = (uint64_t)prev_start;
                            out64[3 * map_index + 1] = (uint64_t)(s + 1);
                            out64[3 * map_index + 2] = (uint64_t)target;
                        } else {
                            out32[3 * map_index] = (uint32_t)prev_start;
                            out32[3 * map_index + 1] = (uint32_t)(s + 1);
                            out32[3 * map_index + 2] = (uint32_t)target;
                        }
                    }
                    ++map_index;
                    prev_start = s + 1;
                    target = target_sample_len(short_seq_ratio, max_seq_length, &rng);
                    seq_len = 0;
                    num_sent = 0;
                }
            }
        }
        if (map_index == epoch_start)
            break;
    }
    if (stats != NULL) {
        stats[0] = empty_docs;
        stats[1] = one_sent_docs;
        stats[2] = long_sent_docs;
    }
    return (int64_t)map_index;
}

/* Megatron's shuffle of the mapping rows: Fisher-Yates with std::mt19937_64(seed),
 * j = rand64() % (i + 1) for i = n-1 .. 1. */
void shuffle_bert_mapping(void *maps, int32_t is_64, int64_t n, uint64_t seed)
{
    mt64_state rng;
    mt64_seed(&rng, seed);
    for (int64_t i = n - 1; i > 0; --i) {
        int64_t j = (int64_t)(mt64_next(&rng) % (uint64_t)(i + 1));
        for (int32_t c = 0; c < 3; ++c) {
            if (is_64) {
                uint64_t *m = (uint64_t *)maps, t = m[3 * i + c];
                m[3 * i + c] = m[3 * j + c];
                m[3 * j + c] = t;
            } else {
                uint32_t *m = (uint32_t *)maps, t = m[3 * i + c];
                m[3 * i + c] = m[3 * j + c];
                m[3 * j + c] = t;
            }
        }
    }
}

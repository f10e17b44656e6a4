/* Decode attention over quantized pages (lcx's int8/int4 cells): one query row per sequence, read
 * straight from the codes, in one call per layer; and the write that quantizes into them. The CPU counterpart of the torch twin's
 * quantized decode paths (torch_impl._decode_page_lists, torch_impl._decode_batch and
 * window._decode_rows_codes), which spend most of their time in two dozen small tensor ops; see
 * cpu_op.py for the contract and the build.
 *
 * Cell layout (quant.py): a token's row on one side (keys, then values row_bytes further) is
 *   [ codes: ceil(D * bits / 8) bytes | pad to even | per group: scale, zero (bf16, little-endian) ]
 * and an element reads back as zero + code * scale of its group (int4: even channel in the low nibble).
 *
 * Each (sequence, KV head) row lists spans (block, lo, hi): offsets [lo, hi) of that physical
 * block are candidates; a span with block < 0 or lo >= hi is padding. An optional extra
 * candidate per row (own_k/own_v, float32) is the step's own key and value. Scores and the
 * softmax are float32, computed in two passes over the candidates (scores, then values); a row
 * without candidates is zero.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LCX_MAX_D 1024
#define LCX_INLINE static inline __attribute__((always_inline))

enum { LCX_OK = 0, LCX_BAD_PARAMS = 1, LCX_NO_MEMORY = 2, LCX_BAD_SPAN = 3, LCX_BAD_SLOT = 4 };

LCX_INLINE float bf16_at(const uint8_t *p) {
    uint32_t bits = ((uint32_t)p[0] | ((uint32_t)p[1] << 8)) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* A row's codes as floats (exact: small integers). */
LCX_INLINE void codes_of(const uint8_t *restrict row, int64_t d, int64_t bits, float *restrict x) {
    if (bits == 8) {
#pragma omp simd
        for (int64_t c = 0; c < d; c++) x[c] = (float)row[c];
    } else {
        int64_t pairs = d / 2;
#pragma omp simd
        for (int64_t i = 0; i < pairs; i++) {
            x[2 * i] = (float)(row[i] & 15);
            x[2 * i + 1] = (float)(row[i] >> 4);
        }
        if (d & 1) x[d - 1] = (float)(row[pairs] & 15);
    }
}

/* Candidates of one row, checked: the number of live tokens, or -1 for a span out of range. */
static int64_t row_tokens(const int32_t *spans, int64_t w, int64_t num_blocks, int64_t block_size) {
    int64_t n = 0;
    for (int64_t i = 0; i < w; i++) {
        int32_t blk = spans[3 * i], lo = spans[3 * i + 1], hi = spans[3 * i + 2];
        if (blk < 0 || lo >= hi) continue;
        if (blk >= num_blocks || lo < 0 || hi > block_size) return -1;
        n += hi - lo;
    }
    return n;
}

typedef struct {
    const uint8_t *cache;
    int64_t s_block, s_token, w, group, row_bytes, meta_at, cap;
    float scale;
} Job;

/* One (sequence, KV head) row: q [G, D] over its spans (and own token) -> o [G, D].
 * Keys are scored on their codes, per group: scale * (q . codes) + zero * sum(q); values are
 * summed the same way: (p * scale) . codes, plus p * zero added once per group at the end.
 * Scratch: p [G, cap], x [D], qsum and zsum [G, ng]. Inlined with constant d, bits and gs for
 * the common head shapes, so the channel loops unroll into whole vectors. */
LCX_INLINE void attend_row(const Job *job, const int32_t *sp, const float *restrict qh, const float *own_k,
                           const float *own_v, const uint8_t *cell, float *restrict o, float *restrict p,
                           float *restrict x, float *restrict qsum, float *restrict zsum,
                           const int64_t d, const int64_t bits, const int64_t gs) {
    const int64_t group = job->group, cap = job->cap, ng = (d + gs - 1) / gs;
    for (int64_t g = 0; g < group; g++)
        for (int64_t k = 0; k < ng; k++) {
            float s = 0.f;
            int64_t end = (k + 1) * gs < d ? (k + 1) * gs : d;
            for (int64_t c = k * gs; c < end; c++) s += qh[g * d + c];
            qsum[g * ng + k] = s;
        }
    /* Pass 1: scores. */
    int64_t t = 0;
    for (int64_t s = 0; s < job->w; s++) {
        int32_t blk = sp[3 * s], lo = sp[3 * s + 1], hi = sp[3 * s + 2];
        if (blk < 0 || lo >= hi) continue;
        for (int32_t tok = lo; tok < hi; tok++, t++) {
            const uint8_t *row = cell + blk * job->s_block + tok * job->s_token;
            codes_of(row, d, bits, x);
            for (int64_t g = 0; g < group; g++) {
                float score = 0.f;
                for (int64_t k = 0; k < ng; k++) {
                    int64_t c0 = k * gs, end = c0 + gs < d ? c0 + gs : d;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t c = c0; c < end; c++) dot += qh[g * d + c] * x[c];
                    const uint8_t *m = row + job->meta_at + 4 * k;
                    score += bf16_at(m) * dot + bf16_at(m + 2) * qsum[g * ng + k];
                }
                p[g * cap + t] = job->scale * score;
            }
        }
    }
    if (own_k != NULL) {
        for (int64_t g = 0; g < group; g++) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < d; c++) dot += qh[g * d + c] * own_k[c];
            p[g * cap + t] = job->scale * dot;
        }
        t++;
    }
    memset(o, 0, sizeof(float) * (size_t)(group * d));
    if (t == 0) return;
    /* Softmax per query head. */
    for (int64_t g = 0; g < group; g++) {
        float *pg = p + g * cap, mx = pg[0], sum = 0.f;
        for (int64_t j = 1; j < t; j++) mx = pg[j] > mx ? pg[j] : mx;
        for (int64_t j = 0; j < t; j++) sum += (pg[j] = expf(pg[j] - mx));
        float inv = 1.f / sum;
        for (int64_t j = 0; j < t; j++) pg[j] *= inv;
    }
    /* Pass 2: the weighted sum of values. */
    memset(zsum, 0, sizeof(float) * (size_t)(group * ng));
    t = 0;
    for (int64_t s = 0; s < job->w; s++) {
        int32_t blk = sp[3 * s], lo = sp[3 * s + 1], hi = sp[3 * s + 2];
        if (blk < 0 || lo >= hi) continue;
        for (int32_t tok = lo; tok < hi; tok++, t++) {
            const uint8_t *row = cell + blk * job->s_block + tok * job->s_token + job->row_bytes;
            codes_of(row, d, bits, x);
            for (int64_t k = 0; k < ng; k++) {
                const uint8_t *m = row + job->meta_at + 4 * k;
                float sc = bf16_at(m), ze = bf16_at(m + 2);
                int64_t c0 = k * gs, end = c0 + gs < d ? c0 + gs : d;
                for (int64_t g = 0; g < group; g++) {
                    float w = p[g * cap + t] * sc;
                    float *og = o + g * d;
#pragma omp simd
                    for (int64_t c = c0; c < end; c++) og[c] += w * x[c];
                    zsum[g * ng + k] += p[g * cap + t] * ze;
                }
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        for (int64_t k = 0; k < ng; k++) {
            int64_t c0 = k * gs, end = c0 + gs < d ? c0 + gs : d;
            for (int64_t c = c0; c < end; c++) o[g * d + c] += zsum[g * ng + k];
        }
        if (own_v != NULL) {
            float w = p[g * cap + t];
#pragma omp simd
            for (int64_t c = 0; c < d; c++) o[g * d + c] += w * own_v[c];
        }
    }
}

int lcx_decode_codes(const float *q,                 /* [n, hkv, G, D] */
                     const uint8_t *cache,           /* cell (b, h) token t at b*s_block + h*s_head + t*s_token */
                     int64_t s_block, int64_t s_head, int64_t s_token, int64_t num_blocks, int64_t block_size,
                     const int32_t *spans,           /* row (i, h) at i*span_seq + h*span_head: w spans of 3 */
                     int64_t span_seq, int64_t span_head, int64_t w,
                     int64_t n, int64_t hkv, int64_t group, int64_t d,
                     int64_t bits, int64_t gs, int64_t row_bytes,
                     const float *own_k, const float *own_v, /* [n, hkv, D] or NULL */
                     float scale, float *out)        /* [n, hkv, G, D] */
{
    if ((bits != 8 && bits != 4) || d < 1 || d > LCX_MAX_D || gs < 1 || group < 1 || n < 0 || hkv < 1 || w < 0)
        return LCX_BAD_PARAMS;
    int64_t data = (d * bits + 7) / 8, ng = (d + gs - 1) / gs;
    Job job = {cache, s_block, s_token, w, group, row_bytes, data + (data & 1), 1, scale};
    if (row_bytes < job.meta_at + 4 * ng) return LCX_BAD_PARAMS;
    int own = own_k != NULL && own_v != NULL;
    for (int64_t i = 0; i < n; i++)
        for (int64_t h = 0; h < hkv; h++) {
            int64_t t = row_tokens(spans + i * span_seq + h * span_head, w, num_blocks, block_size);
            if (t < 0) return LCX_BAD_SPAN;
            if (t + own > job.cap) job.cap = t + own;
        }
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        size_t floats = (size_t)(group * job.cap + d + 2 * group * ng);
        float *scratch = malloc(sizeof(float) * floats);
        if (scratch == NULL) {
            failed = 1;
        } else {
            float *p = scratch, *x = p + group * job.cap, *qsum = x + d, *zsum = qsum + group * ng;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n * hkv; r++) {
                int64_t i = r / hkv, h = r % hkv;
                const int32_t *sp = spans + i * span_seq + h * span_head;
                const float *qh = q + r * group * d;
                const float *ok = own ? own_k + r * d : NULL, *ov = own ? own_v + r * d : NULL;
                const uint8_t *cell = cache + h * s_head;
                float *o = out + r * group * d;
                if (d == 64 && gs == 64 && bits == 8)
                    attend_row(&job, sp, qh, ok, ov, cell, o, p, x, qsum, zsum, 64, 8, 64);
                else if (d == 64 && gs == 64 && bits == 4)
                    attend_row(&job, sp, qh, ok, ov, cell, o, p, x, qsum, zsum, 64, 4, 64);
                else if (d == 128 && gs == 128 && bits == 8)
                    attend_row(&job, sp, qh, ok, ov, cell, o, p, x, qsum, zsum, 128, 8, 128);
                else if (d == 128 && gs == 128 && bits == 4)
                    attend_row(&job, sp, qh, ok, ov, cell, o, p, x, qsum, zsum, 128, 4, 128);
                else
                    attend_row(&job, sp, qh, ok, ov, cell, o, p, x, qsum, zsum, d, bits, gs);
            }
            free(scratch);
        }
    }
    return failed ? LCX_NO_MEMORY : LCX_OK;
}

/* ---- Writing: quantize keys and values into their cells (quant.encode, byte for byte). ---- */

/* float32 -> bfloat16 bits, round to nearest even (as torch converts). */
LCX_INLINE uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

LCX_INLINE float bf16_value(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* quant._outward: x rounded to bfloat16 away from the inside of its group's range. */
LCX_INLINE uint16_t outward(float x, int up) {
    float nudge = fabsf(x) * 0.0078125f + 1e-30f;
    return bf16_bits(up ? x + nudge : x - nudge);
}

/* One side of one token: d elements (float32 or bfloat16 at src) -> its row of row_bytes. */
static void encode_row(const void *src, int in_bf16, int64_t d, int64_t bits, int64_t gs, int64_t meta_at,
                       float *restrict x, uint8_t *restrict codes, uint8_t *restrict row) {
    if (in_bf16) {
        const uint16_t *s = src;
        for (int64_t c = 0; c < d; c++) x[c] = bf16_value(s[c]);
    } else {
        memcpy(x, src, sizeof(float) * (size_t)d);
    }
    const float levels = (float)((1 << bits) - 1);
    for (int64_t c0 = 0, grp = 0; c0 < d; c0 += gs, grp++) {
        int64_t end = c0 + gs < d ? c0 + gs : d;
        float lo = x[c0], hi = x[c0];
        for (int64_t c = c0 + 1; c < end; c++) {
            lo = x[c] < lo ? x[c] : lo;
            hi = x[c] > hi ? x[c] : hi;
        }
        uint16_t zero = outward(lo, 0);
        float zf = bf16_value(zero);
        uint16_t scale = outward((hi - zf) / levels, 1);
        float sf = bf16_value(scale);
        if (!(sf > 0.f)) sf = 1.f;
        for (int64_t c = c0; c < end; c++) {
            float qv = rintf((x[c] - zf) / sf);
            codes[c] = (uint8_t)(qv < 0.f ? 0.f : qv > levels ? levels : qv);
        }
        uint8_t *m = row + meta_at + 4 * grp;
        m[0] = (uint8_t)(scale & 0xff), m[1] = (uint8_t)(scale >> 8);
        m[2] = (uint8_t)(zero & 0xff), m[3] = (uint8_t)(zero >> 8);
    }
    int64_t data = (d * bits + 7) / 8;
    if (bits == 8) {
        memcpy(row, codes, (size_t)d);
    } else {
        for (int64_t i = 0; i < d / 2; i++) row[i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));
        if (d & 1) row[d / 2] = codes[d - 1];
    }
    if (data & 1) row[data] = 0;
}

/* key/value [t, h, D] (element strides per token and head; float32 or bfloat16) -> cells
 * (slot / block_size, head, slot % block_size); negative slots are skipped. */
int lcx_encode_write(const void *key, const void *value, int64_t in_bf16, int64_t k_tok, int64_t k_head,
                     int64_t v_tok, int64_t v_head, int64_t t, int64_t h, const int64_t *slots,
                     uint8_t *cache, int64_t s_block, int64_t s_head, int64_t s_token, int64_t num_blocks,
                     int64_t block_size, int64_t d, int64_t bits, int64_t gs, int64_t row_bytes)
{
    if ((bits != 8 && bits != 4) || d < 1 || d > LCX_MAX_D || gs < 1 || t < 0 || h < 1 || block_size < 1)
        return LCX_BAD_PARAMS;
    int64_t data = (d * bits + 7) / 8, meta_at = data + (data & 1);
    if (row_bytes < meta_at + 4 * ((d + gs - 1) / gs)) return LCX_BAD_PARAMS;
    for (int64_t i = 0; i < t; i++)
        if (slots[i] >= num_blocks * block_size) return LCX_BAD_SLOT;
    const size_t elem = in_bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (t * h >= 64)
    {
        float *x = malloc(sizeof(float) * (size_t)d);
        uint8_t *codes = malloc((size_t)d + 1);
        if (x == NULL || codes == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < t * h; r++) {
                int64_t i = r / h, j = r % h;
                if (slots[i] < 0) continue;
                uint8_t *row = cache + (slots[i] / block_size) * s_block + j * s_head + (slots[i] % block_size) * s_token;
                encode_row((const char *)key + (i * k_tok + j * k_head) * elem, (int)in_bf16, d, bits, gs, meta_at, x,
                           codes, row);
                encode_row((const char *)value + (i * v_tok + j * v_head) * elem, (int)in_bf16, d, bits, gs, meta_at,
                           x, codes, row + row_bytes);
            }
        }
        free(x);
        free(codes);
    }
    return failed ? LCX_NO_MEMORY : LCX_OK;
}

/* ---- Page lists as spans (a decode selection of whole pages, TokenSelect's page variant). ---- */

/* indices [B, Hkv, K] (element strides) of logical pages, counts [B, Hkv] (strides), lens [B],
 * block_table [B, P] (row stride) -> spans [B, Hkv, K, 3]: listed page j of row (b, h) is
 * (block_table[b, page], 0, its written length up to the query at lens[b] - 1) when j < count
 * and the page holds a position <= that query; otherwise padding. */
int lcx_page_list_spans(const int32_t *indices, int64_t i_b, int64_t i_h, const int32_t *counts, int64_t c_b,
                        int64_t c_h, const int64_t *lens, const int32_t *table, int64_t t_b, int64_t pages,
                        int64_t b, int64_t hkv, int64_t k, int64_t block_size, int32_t *spans)
{
    if (b < 0 || hkv < 1 || k < 0 || block_size < 1) return LCX_BAD_PARAMS;
    for (int64_t i = 0; i < b; i++)
        for (int64_t h = 0; h < hkv; h++) {
            int64_t row = lens[i] - 1, n = counts[i * c_b + h * c_h];
            int32_t *out = spans + (i * hkv + h) * k * 3;
            for (int64_t j = 0; j < k; j++) {
                int64_t page = indices[i * i_b + h * i_h + j];
                int ok = j < n && page >= 0 && page < pages && page * block_size <= row;
                int64_t len = row - page * block_size + 1;
                out[3 * j] = ok ? table[i * t_b + page] : -1;
                out[3 * j + 1] = 0;
                out[3 * j + 2] = ok ? (int32_t)(len < block_size ? len : block_size) : 0;
            }
        }
    return LCX_OK;
}

/* ---- Page summaries (state.PageSummaries.update): key min, max, sum and count per page. ---- */

/* key [t, h, D] (float32 or bfloat16, strides per token and head) at slots (negative: skipped)
 * -> min/max/sum [num_blocks, h, D] float32 (contiguous), count [num_blocks] int32. A page
 * written from its first slot is reset first, as the torch update does. */
int lcx_summaries_update(const void *key, int64_t in_bf16, int64_t k_tok, int64_t k_head, int64_t t, int64_t h,
                         int64_t d, const int64_t *slots, int64_t num_blocks, int64_t block_size, float *mn,
                         float *mx, float *sum, int32_t *count)
{
    if (t < 0 || h < 1 || d < 1 || block_size < 1) return LCX_BAD_PARAMS;
    for (int64_t i = 0; i < t; i++)
        if (slots[i] >= num_blocks * block_size) return LCX_BAD_SLOT;
    const int64_t cell = h * d;
    for (int64_t i = 0; i < t; i++) {
        if (slots[i] < 0 || slots[i] % block_size) continue;
        int64_t blk = slots[i] / block_size;
        for (int64_t c = 0; c < cell; c++) {
            mn[blk * cell + c] = INFINITY;
            mx[blk * cell + c] = -INFINITY;
            sum[blk * cell + c] = 0.f;
        }
        count[blk] = 0;
    }
    for (int64_t i = 0; i < t; i++) {
        if (slots[i] < 0) continue;
        int64_t blk = slots[i] / block_size;
        for (int64_t j = 0; j < h; j++) {
            float *a = mn + blk * cell + j * d, *b = mx + blk * cell + j * d, *s = sum + blk * cell + j * d;
            int64_t at = i * k_tok + j * k_head;
            for (int64_t c = 0; c < d; c++) {
                float x = in_bf16 ? bf16_value(((const uint16_t *)key)[at + c]) : ((const float *)key)[at + c];
                a[c] = x < a[c] ? x : a[c];
                b[c] = x > b[c] ? x : b[c];
                s[c] += x;
            }
        }
        count[blk] += 1;
    }
    return LCX_OK;
}

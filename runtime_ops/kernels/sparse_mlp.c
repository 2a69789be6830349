/* graphprune SparseMLP, float32: multiplies the kept weight rows where they lie (no gather copy).
 *
 * Semantics are those of runtime_ops/sparse_mlp.py: per row of x, a selection keeps entries whose
 * score (|v|, or |v| * scale) is greater than a threshold, or the k highest scores (ties to the lower
 * index); the up (and gate) matmul then reads only the kept rows of W_up / W_gate, the down matmul only
 * the kept rows of W_down. Weights are [in, out], row-major, like ONNX MatMul weights.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { GP_RELU = 0, GP_GELU = 1, GP_GELU_TANH = 2, GP_SILU = 3 };
enum { GP_KEEP_ALL = 0, GP_THRESHOLD = 1, GP_TOPK = 2 };

typedef struct {
    int64_t d_in, d_hidden, d_out;
    const float *w_up, *w_gate, *w_down; /* w_gate may be NULL */
    const float *b_up, *b_gate, *b_down; /* each may be NULL */
    const float *s_in, *s_hidden;        /* score scales (WINA), may be NULL */
    int32_t activation, input_mode, hidden_mode, threads;
    float input_threshold, hidden_threshold;
    int64_t input_k, hidden_k;
} gp_sparse_mlp_params;

/* Columns handled by one thread at a time: small enough to share out, large enough to stream rows. */
#define GP_BLOCK 512

static float kth_largest(float *a, int64_t n, int64_t k) {
    /* Quickselect for the k-th largest (1-based k) of a[0..n); reorders a. */
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}

/* Fills keep[] with the kept indices of v (ascending); returns how many. scratch holds 2n floats. */
static int64_t select_rows(const float *v, int64_t n, const float *scale, int32_t mode, float threshold, int64_t k,
                           int64_t *keep, float *scratch) {
    int64_t count = 0;
    if (mode == GP_KEEP_ALL) {
        for (int64_t i = 0; i < n; i++) keep[i] = i;
        return n;
    }
    float *score = scratch;
    for (int64_t i = 0; i < n; i++) score[i] = scale ? fabsf(v[i]) * scale[i] : fabsf(v[i]);
    if (mode == GP_THRESHOLD) {
        for (int64_t i = 0; i < n; i++)
            if (score[i] > threshold) keep[count++] = i;
        return count;
    }
    if (k <= 0) return 0;
    if (k >= n) {
        for (int64_t i = 0; i < n; i++) keep[i] = i;
        return n;
    }
    float *copy = scratch + n;
    memcpy(copy, score, (size_t)n * sizeof(float));
    float cut = kth_largest(copy, n, k);
    int64_t above = 0;
    for (int64_t i = 0; i < n; i++) above += score[i] > cut;
    int64_t ties = k - above; /* entries equal to the cut that still fit, taken from the lowest index */
    for (int64_t i = 0; i < n; i++) {
        if (score[i] > cut || (score[i] == cut && ties-- > 0)) keep[count++] = i;
    }
    return count;
}

/* out[c] (+)= sum over kept r of v[r] * w[r, c], for c in [0, width): reads only the kept rows of w. */
static void rows_times(const float *v, const int64_t *keep, int64_t count, const float *w, int64_t width,
                       const float *bias, float *out, int threads) {
    int64_t blocks = (width + GP_BLOCK - 1) / GP_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t c0 = b * GP_BLOCK, c1 = c0 + GP_BLOCK < width ? c0 + GP_BLOCK : width;
        float *acc = out + c0;
        for (int64_t c = 0; c < c1 - c0; c++) acc[c] = bias ? bias[c0 + c] : 0.0f;
        int64_t t = 0;
        for (; t + 4 <= count; t += 4) {
            const float a0 = v[keep[t]], a1 = v[keep[t + 1]], a2 = v[keep[t + 2]], a3 = v[keep[t + 3]];
            const float *r0 = w + keep[t] * width + c0, *r1 = w + keep[t + 1] * width + c0;
            const float *r2 = w + keep[t + 2] * width + c0, *r3 = w + keep[t + 3] * width + c0;
            for (int64_t c = 0; c < c1 - c0; c++) acc[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c];
        }
        for (; t < count; t++) {
            const float a = v[keep[t]];
            const float *r = w + keep[t] * width + c0;
            for (int64_t c = 0; c < c1 - c0; c++) acc[c] += a * r[c];
        }
    }
}

static float activate(float u, int32_t kind) {
    switch (kind) {
    case GP_RELU: return u > 0.0f ? u : 0.0f;
    case GP_GELU: return 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
    case GP_GELU_TANH: return 0.5f * u * (1.0f + tanhf(0.79788456080286536f * (u + 0.044715f * u * u * u)));
    default: return u / (1.0f + expf(-u));
    }
}

/* y[rows, d_out] = SparseMLP(x[rows, d_in]); returns 0, or 1 when out of memory. */
int gp_sparse_mlp(const gp_sparse_mlp_params *p, const float *x, int64_t rows, float *y) {
    int64_t widest = p->d_in > p->d_hidden ? p->d_in : p->d_hidden;
    float *up = malloc((size_t)p->d_hidden * sizeof(float));
    float *gate = p->w_gate ? malloc((size_t)p->d_hidden * sizeof(float)) : NULL;
    float *scratch = malloc((size_t)widest * 2 * sizeof(float));
    int64_t *keep = malloc((size_t)widest * sizeof(int64_t));
    int failed = !up || !scratch || !keep || (p->w_gate && !gate);
    int threads = p->threads > 0 ? p->threads : 1;
    for (int64_t row = 0; row < rows && !failed; row++) {
        const float *xr = x + row * p->d_in;
        int64_t n = select_rows(xr, p->d_in, p->s_in, p->input_mode, p->input_threshold, p->input_k, keep, scratch);
        rows_times(xr, keep, n, p->w_up, p->d_hidden, p->b_up, up, threads);
        if (p->w_gate) {
            rows_times(xr, keep, n, p->w_gate, p->d_hidden, p->b_gate, gate, threads);
            for (int64_t j = 0; j < p->d_hidden; j++) up[j] *= activate(gate[j], p->activation);
        } else {
            for (int64_t j = 0; j < p->d_hidden; j++) up[j] = activate(up[j], p->activation);
        }
        n = select_rows(up, p->d_hidden, p->s_hidden, p->hidden_mode, p->hidden_threshold, p->hidden_k, keep,
                        scratch);
        rows_times(up, keep, n, p->w_down, p->d_out, p->b_down, y + row * p->d_out, threads);
    }
    free(up);
    free(gate);
    free(scratch);
    free(keep);
    return failed;
}

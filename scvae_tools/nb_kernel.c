/* The NB log-likelihood from decoder logits and its gradient, in one pass per cell; below
 * it, the kernels for inference and data set-up (softmax_scale_rows, count_check_rows,
 * bag_log1p_rows).
 *
 * The C side of scvae_tools/native.py, compiled on first use. The maths, and the torch code
 * this reproduces, are in scvae_tools/fused.py (_nb_core). Per cell r, with
 * log rho = log_softmax(l), mu = lib rho, tm = theta + mu, b = log(1 + mu / theta) and
 * p = (mu - x) / tm:
 *
 *   ll[r]          = sum_g -theta b + x (log rho - log tm) + x log lib
 *                    + sum_{g: x > 0} lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
 *   g_logits[r, g] = theta p - rho sum_h theta_h p_h                  (= -d ll / d l)
 *   g_lt[r, g]     = b - p - (digamma(x + theta) - digamma(theta))   (theta g_lt = -d ll / d log theta)
 *
 * Under the zero-inflated NB (pi_logits given), with zi = log pi/(1 - pi) per entry, each
 * entry adds -softplus(zi), and at x = 0 the term -theta b becomes both = logaddexp(zi,
 * -theta b); with r = exp(-theta b - both) at x = 0 (1 elsewhere), p and b - p are weighted
 * by r, and g_pi = sigmoid(zi) - [x = 0](1 - r) = -d ll / d zi (fused.py, _zinb_core_torch),
 * with 1 - r = exp(zi - both).
 *
 * theta is one row of G per gene, or one row per batch (or per cell) that theta_row picks
 * for each cell. The gamma-function terms vanish where x = 0, so they are evaluated at the
 * non-zeros only: for whole counts up to NB_TABLE_COUNTS as sums of logs, read from tables
 * of theta's rows when the caller made them; from lgamma / digamma otherwise.
 * Rows are independent: the caller splits them across threads, and the result does not
 * depend on the split.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* glibc's vector maths (libmvec): with these declarations gcc vectorises the loops below
 * without -ffinite-math-only, so NaN and inf still reach the caller's checks. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) float logf(float);
#endif

#define NB_TABLE_COUNTS 8
/* Above this many counts a cell's linear terms are summed per non-zero (see nb_rows). */
#define NB_DEEP_COUNTS 16384.0

int nb_table_counts(void) { return NB_TABLE_COUNTS; }

/* Tables of (NB_TABLE_COUNTS + 1) rows by G genes. Row k holds
 * lgamma(theta + k) - lgamma(theta) - log k! and digamma(theta + k) - digamma(theta):
 * sums over j < k of log(theta + j) - log(j + 1) and of 1 / (theta + j). */
void nb_tables(int64_t G, const float *restrict theta, float *restrict lg_tab,
               float *restrict dg_tab)
{
    for (int64_t g = 0; g < G; ++g) lg_tab[g] = dg_tab[g] = 0.0f;
    for (int64_t k = 1; k <= NB_TABLE_COUNTS; ++k) {
        const float *lp = lg_tab + (k - 1) * G, *dp = dg_tab + (k - 1) * G;
        float *lk = lg_tab + k * G, *dk = dg_tab + k * G;
        const float shift = (float)(k - 1), log_k = (float)log((double)k);
        for (int64_t g = 0; g < G; ++g) {
            lk[g] = lp[g] + (logf(theta[g] + shift) - log_k);
            dk[g] = dp[g] + 1.0f / (theta[g] + shift);
        }
    }
}

static double digamma(double x)  /* x > 0: recurrence up to 6, then the asymptotic series */
{
    double r = 0.0;
    while (x < 6.0) {
        r -= 1.0 / x;
        x += 1.0;
    }
    const double f = 1.0 / (x * x);
    return r + log(x) - 0.5 / x
           - f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f / 132))));
}

/* The largest of n values. Compiled with finite maths so that it vectorises: a NaN among
 * them may be missed here, but it still makes the sum of exponentials NaN. */
__attribute__((optimize("finite-math-only"))) static float row_max(const float *l, int64_t n)
{
    float m = l[0];
    for (int64_t g = 1; g < n; ++g) m = l[g] > m ? l[g] : m;
    return m;
}

/* log(1 + r) for r = mu / theta >= 0, accurate to float32 rounding relative to itself.
 * b = log(theta + mu) - log(theta) as a difference of two logs loses it all once theta is
 * large against mu (near-Poisson genes: at theta = 1e4 and mu = 1, b = 1e-4 is left with
 * ~1% error, and theta (b - p), the dispersion's gradient, with none). Below 0.1 the
 * series to r^7 (truncation < 2e-8 relative); above it log(1 + r), whose rounding of
 * 1 + r costs at most ~6e-7 of b. */
static inline float log1p_ratio(float r)
{
    const float series = r * (1.0f - r * (1.0f / 2 - r * (1.0f / 3 - r * (1.0f / 4 - r * (
        1.0f / 5 - r * (1.0f / 6 - r * (1.0f / 7)))))));
    return r < 0.1f ? series : logf(1.0f + r);
}

/* log(1 + exp(-|d|)), the correction term of softplus and logaddexp */
static inline float log1p_exp_neg(float d)
{
    return logf(1.0f + expf(-fabsf(d)));
}

static double lgam(double x)
{
    int sign;
    return lgamma_r(x, &sign);  /* reentrant: rows run on several threads */
}

/* The zero-inflated NB's dense terms of one row (x log rho and the gamma terms apart):
 * returns sum_g [x = 0] both + [x > 0] (-theta b) - softplus(zi) - x log tm, and, with gl
 * not NULL, writes the row's gradient pieces (gl, gt, gp). e: exp(l - max), s its sum.
 * Every expf / logf is called unconditionally, with 0/1 weights instead of branches: the
 * vector variants declared above are "notinbranch", and a call under a condition would
 * keep the loop scalar. */
static double zinb_terms(int64_t G, const float *restrict e, float lib_s, float s,
                         const float *restrict theta, const float *restrict log_theta,
                         const float *restrict xr, const float *restrict zi,
                         float *restrict gl, float *restrict gt, float *restrict gp,
                         double *restrict lin)
{
    double acc = 0.0, x_ltm = 0.0;  /* x_ltm: sum_g x log tm, returned through lin */
    if (!gl) {
        for (int64_t g = 0; g < G; ++g) {
            const float b = log1p_ratio(lib_s * e[g] / theta[g]), nb0 = -theta[g] * b;
            const float z = zi[g];
            const float soft = (z > 0.0f ? z : 0.0f) + log1p_exp_neg(z);
            const float both = (z > nb0 ? z : nb0) + log1p_exp_neg(z - nb0);
            acc += (xr[g] == 0.0f ? both : nb0) - soft;
            x_ltm += xr[g] * (log_theta[g] + b);
        }
        *lin -= x_ltm;
        return acc;
    }
    float sp = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
        const float mu = lib_s * e[g], tm = theta[g] + mu;
        const float b = log1p_ratio(mu / theta[g]), nb0 = -theta[g] * b;
        const float z = zi[g];
        const int zero = xr[g] == 0.0f;
        const float soft = (z > 0.0f ? z : 0.0f) + log1p_exp_neg(z);
        const float both = (z > nb0 ? z : nb0) + log1p_exp_neg(z - nb0);
        /* at a zero, r = w_zero and 1 - r = exp(z - both): not as 1 - w_zero, which rounds
         * to 0 once z is far below nb0 */
        const float w_zero = expf(nb0 - both), not_r = expf(z - both);
        const float sig = 1.0f / (1.0f + expf(-z));
        const float w = zero ? w_zero : 1.0f;  /* r: w_zero at a zero, else 1 */
        /* selects, not 0/1 weights: nb0 + zero (both - nb0) cancels in float32 when nb0
         * is far below both */
        acc += (zero ? both : nb0) - soft;
        x_ltm += xr[g] * (log_theta[g] + b);
        const float p = (mu - xr[g]) / tm * w;
        sp += theta[g] * p;
        gt[g] = b * w - p;
        gl[g] = theta[g] * p;
        gp[g] = sig - (zero ? not_r : 0.0f);
    }
    const float sp_s = sp / s;  /* rho = e / s */
    for (int64_t g = 0; g < G; ++g) gl[g] -= e[g] * sp_s;
    *lin -= x_ltm;
    return acc;
}

/* Rows [r0, r1) of a block of G genes. logits, x: row-major (rows x G); log_lib: one per
 * row; theta, log_theta: rows of G, row r of the block using row theta_row[r] of them (row
 * 0 when theta_row is NULL: one theta per gene). The non-zeros of row r are entries
 * starts[r] .. starts[r + 1] - 1 of (cols, values). lg_tab, dg_tab: nb_tables of all
 * theta's rows (tab_stride = their number times G), or NULL to compute every gamma term.
 * Writes ll[r] and, when g_logits is not NULL, rows of g_logits and g_lt; rho_row is G
 * floats of scratch. With pi_logits (rows x G) not NULL, the zero-inflated NB, and rows of
 * g_pi when g_logits is not NULL. */
static void nb_rows(int64_t r0, int64_t r1, int64_t G, const float *restrict logits,
                    const float *restrict log_lib, const float *restrict theta_rows,
                    const float *restrict log_theta_rows, const int64_t *restrict theta_row,
                    int64_t tab_stride, const float *restrict x,
                    const int64_t *restrict starts, const int64_t *restrict cols,
                    const float *restrict values, const float *restrict lg_tab,
                    const float *restrict dg_tab, float *restrict ll, float *restrict g_logits,
                    float *restrict g_lt, float *restrict rho_row,
                    const float *restrict pi_logits, float *restrict g_pi)
{
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t t0 = theta_row ? theta_row[r] * G : 0;
        const float *restrict theta = theta_rows + t0, *restrict log_theta = log_theta_rows + t0;
        const float *restrict l = logits + r * G;
        const float *restrict xr = x + r * G;
        const float m = row_max(l, G);
        /* exp(l - m) once: rho is it over the sum s, and log rho = (l - m) - log s */
        float *restrict e = rho_row, s = 0.0f;
        /* acc: the terms of theta and the dropout logits; lin: those linear in x,
         * sum_g x log(mu / tm), kept apart because they can be replaced (deep cells) */
        double acc = 0.0, lin = 0.0, sx = 0.0;
        for (int64_t g = 0; g < G; ++g) {
            const float d = l[g] - m;
            s += e[g] = expf(d);
            /* x·(l - m) here, apart from x·log(θ+μ) below: in one expression the compiler
             * (-fassociative-math) may regroup it as l - (m + log(θ+μ)), and with logits
             * sharing a large offset m that cancels in float32 */
            lin += xr[g] * d;
            sx += xr[g];
        }
        const float llib = log_lib[r], lib = expf(llib);
        const float lib_s = lib / s;
        float *restrict gt = g_lt ? g_lt + r * G : NULL;
        if (pi_logits) {  /* the zero-inflated NB */
            acc += zinb_terms(G, e, lib_s, s, theta, log_theta, xr, pi_logits + r * G,
                              g_logits ? g_logits + r * G : NULL, gt,
                              g_pi ? g_pi + r * G : NULL, &lin);
        } else if (g_logits) {
            float *restrict gl = g_logits + r * G;
            float sp = 0.0f;
            for (int64_t g = 0; g < G; ++g) {
                const float mu = lib_s * e[g], tm = theta[g] + mu;
                const float b = log1p_ratio(mu / theta[g]), ltm = log_theta[g] + b;
                const float p = (mu - xr[g]) / tm;
                lin -= xr[g] * ltm;
                acc -= theta[g] * b;
                sp += theta[g] * p;
                gt[g] = b - p;
                gl[g] = theta[g] * p;
            }
            const float sp_s = sp / s;  /* rho = e / s */
            for (int64_t g = 0; g < G; ++g) gl[g] -= e[g] * sp_s;
        } else {
            for (int64_t g = 0; g < G; ++g) {
                const float b = log1p_ratio(lib_s * e[g] / theta[g]);
                lin -= xr[g] * (log_theta[g] + b);
                acc -= theta[g] * b;
            }
        }
        double lg_sum = 0.0;
        for (int64_t j = starts[r]; j < starts[r + 1]; ++j) {
            const float v = values[j];
            const int64_t c = cols[j];
            if (v == 0.0f) continue;  /* a stored zero: the terms vanish */
            const int64_t k = (int64_t)v;
            double lg, dg = 0.0;
            if (v < 0.0f) {  /* not a count: no table row holds it (k < 0 read outside) */
                lg = dg = NAN;
            } else if (lg_tab && (float)k == v && k <= NB_TABLE_COUNTS) {
                lg = lg_tab[k * tab_stride + t0 + c];
                if (gt) dg = dg_tab[k * tab_stride + t0 + c];
            } else if ((float)k == v && k <= NB_TABLE_COUNTS) {
                /* no tables (a theta per entry): the same sums as nb_tables, for this entry
                 * alone; k logs cost less than three lgamma and two digamma calls */
                const double t = theta[c];
                lg = 0.0;
                for (int64_t i = 0; i < k; ++i) {
                    lg += log(t + (double)i) - log((double)(i + 1));
                    if (gt) dg += 1.0 / (t + (double)i);
                }
            } else {
                const double t = theta[c], xv = v;
                lg = lgam(xv + t) - lgam(t) - lgam(xv + 1.0);
                if (gt) dg = digamma(xv + t) - digamma(t);
            }
            lg_sum += lg;
            if (gt) gt[c] -= (float)dg;
        }
        /* log rho = (l - m) - log s: relative to the row's maximum, so that logits sharing a
         * large offset do not cancel in float32 (log z itself is about that offset) */
        const double log_s = log((double)s);
        lin += ((double)llib - log_s) * sx;
        if (sx > NB_DEEP_COUNTS) {
            /* Deep cells: the sums above are each ~|x| log mu and cancel to far less, and
             * the float32 rounding of log tm per entry leaves ~1.5e-7 nats per count (0.15
             * at 1e6 counts). Here x log(mu / tm) = -x softplus(log theta - log mu), at the
             * non-zeros only, in double: as the torch code computes it. */
            lin = 0.0;
            for (int64_t j = starts[r]; j < starts[r + 1]; ++j) {
                const double v = values[j];
                const int64_t c = cols[j];
                if (v == 0.0) continue;
                const double t = (double)log_theta[c] - ((double)(l[c] - m) - log_s + llib);
                lin -= v * (t > 0.0 ? t + log1p(exp(-t)) : log1p(exp(t)));
            }
        }
        ll[r] = (float)(acc + lin + lg_sum);
    }
}

/* Every entry point below splits its rows across a parallel region of team_size threads,
 * each taking the share thread_rows gives it. Built with -fopenmp only when torch's own
 * OpenMP runtime is loaded, so that the region runs on torch's (already warm) threads;
 * without OpenMP the pragma is ignored and the one "thread" takes all rows. */
__attribute__((unused))  /* unused without OpenMP, where the pragmas that call it are ignored */
static int team_size(int n_threads, int64_t n_rows)  /* at least 1, at most one per row */
{
    if (n_threads > n_rows) n_threads = (int)n_rows;
    return n_threads < 1 ? 1 : n_threads;
}

/* This thread's rows [*r0, *r1) of n_rows; returns its index in the team. */
static int thread_rows(int64_t n_rows, int64_t *r0, int64_t *r1)
{
#ifdef _OPENMP
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int t = 0, n = 1;
#endif
    *r0 = n_rows * t / n;
    *r1 = n_rows * (t + 1) / n;
    return t;
}

/* nb_rows over all n_rows rows, on up to n_threads threads (scratch holds n_threads rows
 * of G floats). */
void nb_block(int64_t n_rows, int64_t G, int n_threads, const float *restrict logits,
              const float *restrict log_lib, const float *restrict theta,
              const float *restrict log_theta, const int64_t *restrict theta_row,
              int64_t tab_stride, const float *restrict x,
              const int64_t *restrict starts, const int64_t *restrict cols,
              const float *restrict values, const float *restrict lg_tab,
              const float *restrict dg_tab, float *restrict ll, float *restrict g_logits,
              float *restrict g_lt, float *restrict scratch, const float *restrict pi_logits,
              float *restrict g_pi)
{
    if (G <= 0) {  /* no genes: every row's log-likelihood is the empty sum */
        for (int64_t r = 0; r < n_rows; ++r) ll[r] = 0.0f;
        return;
    }
#pragma omp parallel num_threads(team_size(n_threads, n_rows))
    {
        int64_t r0, r1;
        const int t = thread_rows(n_rows, &r0, &r1);
        nb_rows(r0, r1, G, logits, log_lib, theta, log_theta, theta_row, tab_stride, x, starts,
                cols, values, lg_tab,
                dg_tab, ll, g_logits, g_lt, scratch + t * G, pi_logits, g_pi);
    }
}

/* Rows [r0, r1) of out (rows x G) become scale[r] * softmax(row), in place: one read and
 * one write of each row from memory, the three sweeps over it running in cache. scale has
 * one value per row, or one for all rows when scale_step is 0. */
static void softmax_scale(int64_t r0, int64_t r1, int64_t G, float *restrict out,
                          const float *restrict scale, int64_t scale_step)
{
    for (int64_t r = r0; r < r1; ++r) {
        float *restrict row = out + r * G;
        const float m = row_max(row, G);
        float s = 0.0f;
        for (int64_t g = 0; g < G; ++g) s += row[g] = expf(row[g] - m);
        const float f = scale[r * scale_step] / s;
        for (int64_t g = 0; g < G; ++g) row[g] *= f;
    }
}

void softmax_scale_rows(int64_t n_rows, int64_t G, int n_threads, float *restrict out,
                        const float *restrict scale, int64_t scale_step)
{
    if (G <= 0) return;  /* no genes: nothing to scale (and row_max would read l[0]) */
#pragma omp parallel num_threads(team_size(n_threads, n_rows))
    {
        int64_t r0, r1;
        thread_rows(n_rows, &r0, &r1);
        softmax_scale(r0, r1, G, out, scale, scale_step);
    }
}

/* Row sums of a float32 count matrix, and what is wrong with its values, in one read.
 * Rows are CSR rows (data[indptr[r]] to data[indptr[r + 1] - 1]) or, when indptr is NULL,
 * dense rows of n_cols values. Sums accumulate in double (exact for whole counts).
 * Returns bit 1 for NaN or inf, bit 2 for a negative value, bit 4 for a fractional one. */
#define COUNT_NONFINITE 1
#define COUNT_NEGATIVE 2
#define COUNT_FRACTIONAL 4

static int count_rows(int64_t r0, int64_t r1, const int64_t *restrict indptr, int64_t n_cols,
                      const float *restrict data, float *restrict totals)
{
    int flags = 0;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t a = indptr ? indptr[r] : r * n_cols;
        const int64_t b = indptr ? indptr[r + 1] : a + n_cols;
        double s = 0.0;
        int nonfinite = 0, negative = 0, fractional = 0;
        for (int64_t k = a; k < b; ++k) {
            const float v = data[k];
            s += v;
            nonfinite |= !(fabsf(v) <= 3.4028234663852886e38f);  /* true for NaN as well */
            negative |= v < 0.0f;
            fractional |= fabsf(v - rintf(v)) > 0.0f;  /* false for NaN and inf */
        }
        totals[r] = (float)s;
        flags |= (nonfinite ? COUNT_NONFINITE : 0) | (negative ? COUNT_NEGATIVE : 0)
                 | (fractional ? COUNT_FRACTIONAL : 0);
    }
    return flags;
}

int count_check_rows(int64_t n_rows, int n_threads, const int64_t *restrict indptr,
                     int64_t n_cols, const float *restrict data, float *restrict totals)
{
    int flags = 0;
#pragma omp parallel num_threads(team_size(n_threads, n_rows)) reduction(| : flags)
    {
        int64_t r0, r1;
        thread_rows(n_rows, &r0, &r1);
        flags |= count_rows(r0, r1, indptr, n_cols, data, totals);
    }
    return flags;
}

/* The encoder's first layer at inference, on sparse counts (VAE.encode's embedding bag):
 * out[r, :] = bias + sum over row r's non-zeros (c, v) of log(1 + v) W[c, :], with W a
 * genes x H table. Per tile of rows and block of genes, a row's H outputs stay in
 * registers while its non-zeros in the block add their W rows, and the block's W rows stay
 * in cache for the tile's other rows. */
typedef float v16 __attribute__((vector_size(64)));  /* AVX-512 register, or two AVX ones */
/* The same, at any float's address (unaligned loads and stores, aliasing floats). */
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
#define load16(p) (*(const v16u *)(p))
#define store16(p, v) (*(v16u *)(p) = (v))

#define BAG_VECTORS 8     /* 128 outputs of a row per sweep */
#define BAG_TILE_ROWS 64
#define BAG_BLOCK_NONZEROS 28  /* non-zeros of a row per gene block, on average */

/* Row o's outputs [16 nv) plus its non-zeros k.. with columns below g_hi (weights w[k - base]);
 * returns the next k. Inlined with a constant nv, so that the accumulators live in registers. */
static inline __attribute__((always_inline)) int64_t
bag_span(const int nv, float *restrict o, const float *restrict W, int64_t H,
         const int32_t *restrict col, const float *restrict w, int64_t base, int64_t k,
         int64_t end, int64_t g_hi)
{
    v16 a[BAG_VECTORS];
    for (int j = 0; j < nv; ++j) a[j] = load16(o + 16 * j);
    for (; k < end && col[k] < g_hi; ++k) {
        const v16 s = (v16){0} + w[k - base];
        const float *restrict Wr = W + (int64_t)col[k] * H;
        for (int j = 0; j < nv; ++j) a[j] += s * load16(Wr + 16 * j);
    }
    for (int j = 0; j < nv; ++j) store16(o + 16 * j, a[j]);
    return k;
}

/* Rows [r0, r1); w holds one tile's weights, cursor one per tile row. 1 if a row's columns
 * descend (the sweep by gene blocks needs them ascending), else 0. */
static int bag_rows(int64_t r0, int64_t r1, int64_t G, int64_t H,
                    const int64_t *restrict indptr, const int32_t *restrict col,
                    const float *restrict val, const float *restrict W,
                    const float *restrict bias, float *restrict out, float *restrict w,
                    int64_t *restrict cursor)
{
    for (int64_t t0 = r0; t0 < r1; t0 += BAG_TILE_ROWS) {
        const int64_t t1 = t0 + BAG_TILE_ROWS < r1 ? t0 + BAG_TILE_ROWS : r1;
        const int64_t base = indptr[t0], nnz = indptr[t1] - base;
        const float *restrict v = val + base;
        for (int64_t k = 0; k < nnz; ++k) w[k] = logf(1.0f + v[k]);
        int descending = 0;
        for (int64_t r = t0; r < t1; ++r) {
            for (int64_t k = indptr[r] + 1; k < indptr[r + 1]; ++k) descending |= col[k] < col[k - 1];
            float *restrict o = out + r * H;
            for (int64_t h = 0; h < H; ++h) o[h] = bias[h];
        }
        if (descending) return 1;
        /* Blocks of genes holding ~BAG_BLOCK_NONZEROS of an average row's non-zeros. */
        const int64_t per_row = nnz / (t1 - t0) + 1;
        int64_t block = BAG_BLOCK_NONZEROS * G / per_row;
        block = block < 32 ? 32 : block > G ? G : block;
        for (int64_t h0 = 0; h0 < H; h0 += 16 * BAG_VECTORS) {
            const int nv = (int)((H - h0) / 16 < BAG_VECTORS ? (H - h0) / 16 : BAG_VECTORS);
            const float *restrict Wh = W + h0;
            for (int64_t r = t0; r < t1; ++r) cursor[r - t0] = indptr[r];
            for (int64_t g_hi = block; g_hi < G + block; g_hi += block) {
                for (int64_t r = t0; r < t1; ++r) {
                    int64_t k = cursor[r - t0];
                    const int64_t end = indptr[r + 1];
                    if (k >= end || col[k] >= g_hi) continue;
                    float *restrict o = out + r * H + h0;
                    switch (nv) {
                    case 8: k = bag_span(8, o, Wh, H, col, w, base, k, end, g_hi); break;
                    case 7: k = bag_span(7, o, Wh, H, col, w, base, k, end, g_hi); break;
                    case 6: k = bag_span(6, o, Wh, H, col, w, base, k, end, g_hi); break;
                    case 5: k = bag_span(5, o, Wh, H, col, w, base, k, end, g_hi); break;
                    case 4: k = bag_span(4, o, Wh, H, col, w, base, k, end, g_hi); break;
                    case 3: k = bag_span(3, o, Wh, H, col, w, base, k, end, g_hi); break;
                    case 2: k = bag_span(2, o, Wh, H, col, w, base, k, end, g_hi); break;
                    default: k = bag_span(1, o, Wh, H, col, w, base, k, end, g_hi); break;
                    }
                    cursor[r - t0] = k;
                }
            }
        }
    }
    return 0;
}

/* bag_rows over all n_rows rows (H a multiple of 16) on up to n_threads threads; w has
 * w_stride floats per thread (at least the non-zeros of any BAG_TILE_ROWS rows), cursor
 * BAG_TILE_ROWS per thread. Returns 1 if some row's columns descend (out is then unusable). */
int bag_log1p_rows(int64_t n_rows, int64_t G, int64_t H, int n_threads,
                   const int64_t *restrict indptr, const int32_t *restrict col,
                   const float *restrict val, const float *restrict W,
                   const float *restrict bias, float *restrict out, float *restrict w,
                   int64_t w_stride, int64_t *restrict cursor)
{
    int descending = 0;
#pragma omp parallel num_threads(team_size(n_threads, n_rows)) reduction(| : descending)
    {
        int64_t r0, r1;
        const int t = thread_rows(n_rows, &r0, &r1);
        descending |= bag_rows(r0, r1, G, H, indptr, col, val, W, bias, out, w + t * w_stride,
                               cursor + t * BAG_TILE_ROWS);
    }
    return descending;
}

int bag_tile_rows(void) { return BAG_TILE_ROWS; }

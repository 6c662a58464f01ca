/* Run loops for one element type; included by cnn_runs.h (no guard). */

/* sum(p[:n]) */
CNN_CLONES static double CNN_FN(cnn_run_sum)(const CNN_T *restrict p, ptrdiff_t n) {
    double s = 0.0;
    CNN_SIMD_SUM(s)
    for (ptrdiff_t i = 0; i < n; i++) s += (double)p[i];
    return s;
}

/* sum((p[:n] - m) ** 2) */
CNN_CLONES static double CNN_FN(cnn_run_sum_sq_dev)(const CNN_T *restrict p, ptrdiff_t n,
                                                         double m) {
    double s = 0.0;
    CNN_SIMD_SUM(s)
    for (ptrdiff_t i = 0; i < n; i++) {
        const double d = (double)p[i] - m;
        s += d * d;
    }
    return s;
}

/* sum_dy[0] += sum(dy[:n]); sum_dy_dev[0] += sum(dy[:n] * (p[:n] - m)) */
CNN_CLONES static void CNN_FN(cnn_run_sum_dy_dev)(const CNN_T *restrict dy,
                                                       const CNN_T *restrict p, ptrdiff_t n,
                                                       double m, double *sum_dy,
                                                       double *sum_dy_dev) {
    double a = 0.0, b = 0.0;
    CNN_SIMD_SUM(a, b)
    for (ptrdiff_t i = 0; i < n; i++) {
        a += (double)dy[i];
        b += (double)dy[i] * ((double)p[i] - m);
    }
    *sum_dy += a;
    *sum_dy_dev += b;
}

/* dst[:n] = (src[:n] - m) * scale + shift */
CNN_CLONES static void CNN_FN(cnn_run_affine)(const CNN_T *restrict src,
                                                   CNN_T *restrict dst, ptrdiff_t n, double m,
                                                   double scale, double shift) {
    CNN_SIMD
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = (CNN_T)(((double)src[i] - m) * scale + shift);
}

/* dx[:n] = a * (dy[:n] * c - b - (x[:n] - m) * k); with c = 1 and b = dy (one sample in a
 * batch), dy * c - b is exactly 0 */
CNN_CLONES static void CNN_FN(cnn_run_dx)(const CNN_T *restrict dy, const CNN_T *restrict x,
                                               CNN_T *restrict dx, ptrdiff_t n, double a,
                                               double c, double b, double m, double k) {
    CNN_SIMD
    for (ptrdiff_t i = 0; i < n; i++) {
        dx[i] = (CNN_T)(a * ((double)dy[i] * c - b - ((double)x[i] - m) * k));
    }
}

/* The trunk kernel of prune_ext: a chain of convolutions (valid, stride 1, optional ReLU) and max-pools (valid) over
 * one image at a time, every output summed in oneDNN's order (see trunk_forward in _kernels.pyx):
 *     acc = 0;  for ky, for kx, for ci: acc = fma(x[y+ky, x+kx, ci], K[ky, kx, ci, co], acc);  y = acc + b;  relu
 *
 * Included by _simd.h once per instruction set that has FMA (BP_FMA and BP_SET1 defined), inside its macros.
 *
 * In between the layers an image is planar: channel planes of rows. A convolution is computed over the whole width
 * of its input's rows (a vector of outputs is BP_VW consecutive floats of the plane, whatever rows they span), so
 * a tap is one unaligned vector load at a fixed offset (ky * row + kx); the outputs past a row's valid width are
 * garbage that nothing reads. Each plane is followed by BP_TR_PAD floats that those over-reads may touch. Each vector
 * of outputs keeps up to TR_NB output channels in registers over all its taps: an input vector is loaded once per
 * tap and channel, and a weight is broadcast from memory into the FMA. Everything of one image stays in L2. */

#define TR_CONV BP_ISA(tr_conv)
#define TR_TAB BP_ISA(tr_tab)

/* y[oc0 + j, q] = relu?(sum_{ky,kx,ci} x[ci, q + ky*rs + kx] * K[ky, kx, ci, oc0 + j] + b[oc0 + j])  for j < NB,
   q < Q (rounded up to whole vectors); planes of x and y are psx, psy floats apart */
#define TR_MK(NB)                                                                                                    \
BP_TARGET static void BP_ISA(tr_conv_##NB)(const float *x, size_t psx, int rs, int IC, const float *K, int KH,       \
                                          int KW, int OC, int oc0, const float *b, int relu, float *y, size_t psy,   \
                                          int Q) {                                                                   \
    for (int q0 = 0; q0 < Q; q0 += BP_VW) {                                                                          \
        VF acc[NB];                                                                                                  \
        _Pragma("GCC unroll 32") for (int j = 0; j < NB; j++) acc[j] = BP_SET1(0.0f);                                \
        for (int ky = 0; ky < KH; ky++)                                                                              \
            for (int kx = 0; kx < KW; kx++) {                                                                        \
                const float *xp = x + q0 + ky * rs + kx;                                                             \
                const float *kp = K + (size_t)(ky * KW + kx) * IC * OC + oc0;                                        \
                for (int c = 0; c < IC; c++, xp += psx, kp += OC) {                                                  \
                    VF xv = LD(xp);                                                                                  \
                    _Pragma("GCC unroll 32") for (int j = 0; j < NB; j++) acc[j] = BP_FMA(xv, BP_SET1(kp[j]), acc[j]); \
                }                                                                                                    \
            }                                                                                                        \
        _Pragma("GCC unroll 32") for (int j = 0; j < NB; j++) {                                                      \
            VF v = acc[j] + BP_SET1(b[oc0 + j]);                                                                     \
            if (relu) v = VMAX(v, BP_SET1(0.0f));                                                                    \
            ST(y + (size_t)(oc0 + j) * psy + q0, v);                                                                 \
        }                                                                                                            \
    }                                                                                                                \
}
TR_MK(1) TR_MK(2) TR_MK(3) TR_MK(4) TR_MK(5) TR_MK(6) TR_MK(7) TR_MK(8) TR_MK(9) TR_MK(10) TR_MK(11) TR_MK(12)
#if BP_VW >= 16
TR_MK(13) TR_MK(14) TR_MK(15) TR_MK(16) TR_MK(17) TR_MK(18) TR_MK(19) TR_MK(20) TR_MK(21) TR_MK(22) TR_MK(23)
TR_MK(24)
#define TR_NB 24  /* accumulators: 32 vector registers */
#else
#define TR_NB 12  /* 16 vector registers */
#endif
#undef TR_MK

typedef void (*BP_ISA(tr_fn))(const float *, size_t, int, int, const float *, int, int, int, int, const float *, int,
                              float *, size_t, int);
static const BP_ISA(tr_fn) TR_TAB[TR_NB + 1] = {
    NULL, BP_ISA(tr_conv_1), BP_ISA(tr_conv_2), BP_ISA(tr_conv_3), BP_ISA(tr_conv_4), BP_ISA(tr_conv_5),
    BP_ISA(tr_conv_6), BP_ISA(tr_conv_7), BP_ISA(tr_conv_8), BP_ISA(tr_conv_9), BP_ISA(tr_conv_10),
    BP_ISA(tr_conv_11), BP_ISA(tr_conv_12),
#if BP_VW >= 16
    BP_ISA(tr_conv_13), BP_ISA(tr_conv_14), BP_ISA(tr_conv_15), BP_ISA(tr_conv_16), BP_ISA(tr_conv_17),
    BP_ISA(tr_conv_18), BP_ISA(tr_conv_19), BP_ISA(tr_conv_20), BP_ISA(tr_conv_21), BP_ISA(tr_conv_22),
    BP_ISA(tr_conv_23), BP_ISA(tr_conv_24),
#endif
};

/* the output channels in blocks of at most TR_NB, as even as possible */
BP_TARGET static void TR_CONV(const float *x, size_t psx, int rs, int IC, const float *K, int KH, int KW, int OC,
                              const float *b, int relu, float *y, size_t psy, int Q) {
    int nblk = (OC + TR_NB - 1) / TR_NB;
    for (int i = 0, oc0 = 0; i < nblk; i++) {
        int nb = (OC - oc0) / (nblk - i);
        TR_TAB[nb](x, psx, rs, IC, K, KH, KW, OC, oc0, b, relu, y, psy, Q);
        oc0 += nb;
    }
}

/* o[c, i, j] = max(-FLT_MAX, y[c, i*sh + dy, j*sw + dx] for dy < ph, dx < pw), NaN passed over (TensorFlow's
   max-pool: m = -FLT_MAX, then m = v > m ? v : m over the window): y's rows rs apart, planes psy apart; o compact
   (rows ow apart, planes pso apart) */
BP_TARGET static void BP_ISA(tr_pool)(const float *y, size_t psy, int rs, int C, float *o, size_t pso, int oh,
                                      int ow, int ph, int pw, int sh, int sw) {
#if BP_VW == 16 || BP_VW == 8
    if (ph == 2 && pw == 2 && sh == 2 && sw == 2) {  /* rows pairwise, then even and odd columns */
#if BP_VW == 16
        const VI ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}, od = ev + 1;
#else
        const VI ev = {0, 2, 4, 6, 8, 10, 12, 14}, od = ev + 1;
#endif
        const VF lo = BP_SET1(-FLT_MAX);
        for (int c = 0; c < C; c++)
            for (int i = 0; i < oh; i++) {
                const float *r0 = y + c * psy + (size_t)(2 * i) * rs, *r1 = r0 + rs;
                float *op = o + c * pso + (size_t)i * ow;
                for (int j = 0; j < ow; j += BP_VW) {  /* the last store may run into the next row: written after */
                    /* columns 2j.. and 2j + BP_VW.., rows 2i then 2i + 1 (VMAX(v, m): v > m ? v : m) */
                    VF a = VMAX(LD(r1 + 2 * j), VMAX(LD(r0 + 2 * j), lo));
                    VF b = VMAX(LD(r1 + 2 * j + BP_VW), VMAX(LD(r0 + 2 * j + BP_VW), lo));
                    /* the even column's maximum, then the odd one's */
                    ST(op + j, VMAX(__builtin_shuffle(a, b, od), __builtin_shuffle(a, b, ev)));
                }
            }
        return;
    }
#endif
    for (int c = 0; c < C; c++)
        for (int i = 0; i < oh; i++)
            for (int j = 0; j < ow; j++) {
                const float *p = y + c * psy + (size_t)(i * sh) * rs + (size_t)j * sw;
                float m = -FLT_MAX;
                for (int dy = 0; dy < ph; dy++)
                    for (int dx = 0; dx < pw; dx++) {
                        float v = p[(size_t)dy * rs + dx];
                        m = v > m ? v : m;
                    }
                o[c * pso + (size_t)i * ow + j] = m;
            }
}

/* The trunk over images X[0:N] (H, W, C channels-last) into Y (channels-last). spec: nl layers of 8 ints, a
   convolution {0, KH, KW, IC, OC, relu} with Ks[l] (KH, KW, IC, OC) and Bs[l] (OC), a max-pool {1, ph, pw, sh, sw};
   the shapes were checked by the caller. buf: two planar tensors of bufn floats each. */
BP_TARGET static void BP_ISA(trunk)(const float *X, int N, int H, int W, int C, int nl, const int *spec,
                                    const float *const *Ks, const float *const *Bs, float *Y, float *buf,
                                    size_t bufn) {
    for (int n = 0; n < N; n++) {
        const float *xi = X + (size_t)n * H * W * C;
        float *cur = buf, *nxt = buf + bufn;
        int h = H, w = W, rs = W, c = C;
        size_t ps = (size_t)H * W + BP_TR_PAD;
        for (int p = 0; p < H * W; p++)  /* channels-last to planar */
            for (int k = 0; k < C; k++) cur[k * ps + p] = xi[(size_t)p * C + k];
        for (int l = 0; l < nl; l++) {
            const int *s = spec + 8 * l;
            if (s[0] == 0) {
                int oh = h - s[1] + 1;
                size_t pso = (size_t)oh * rs + BP_TR_PAD;
                TR_CONV(cur, ps, rs, c, Ks[l], s[1], s[2], s[4], Bs[l], s[5], nxt, pso, oh * rs);
                h = oh; w = w - s[2] + 1; c = s[4]; ps = pso;
            } else {
                int oh = (h - s[1]) / s[3] + 1, ow = (w - s[2]) / s[4] + 1;
                size_t pso = (size_t)oh * ow + BP_TR_PAD;
                BP_ISA(tr_pool)(cur, ps, rs, c, nxt, pso, oh, ow, s[1], s[2], s[3], s[4]);
                h = oh; w = ow; rs = ow; ps = pso;
            }
            float *t = cur; cur = nxt; nxt = t;
        }
        float *yo = Y + (size_t)n * h * w * c;  /* planar to channels-last */
        for (int i = 0; i < h; i++)
            for (int j = 0; j < w; j++)
                for (int k = 0; k < c; k++) yo[((size_t)i * w + j) * c + k] = cur[k * ps + (size_t)i * rs + j];
    }
}

#undef TR_CONV
#undef TR_TAB
#undef TR_NB

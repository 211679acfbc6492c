/* The vector kernels of prune_ext, written once for a vector of BP_VW floats and compiled once per instruction set.
 *
 * _kernels.pyx includes this file once per instance, with
 *   BP_ISA(f)   the instance's name for f (f_avx512, f_avx2, f_base);
 *   BP_TARGET   its target attribute (empty for the portable instance);
 *   BP_VW       floats per vector: 16 (AVX-512), 8 (AVX2), 4 (the 128-bit sets: SSE2, NEON);
 *   BP_SPARSE   1 to build the sparse final-layer kernels too (only wide vector units run them);
 *   BP_NONZEROS the nonzero scan the sparse kernels use (AVX-512 has a compressing one);
 *   BP_FMA, BP_SET1 (where the set has FMA) a fused multiply-add and a broadcast, to build the trunk kernel
 *               (_trunk.h) too.
 * and undefines them at its end.
 * A vector is exactly as wide as the instruction set's registers: GCC keeps a wider generic vector in memory, which
 * made AVX2 run the earlier 16-float code of the sparse kernels 11-21 times slower than its 8-float code here.
 *
 * The kernels' formulas are the docstrings of their cpdef entry points in _kernels.pyx. */

#if defined(__GNUC__)
typedef float BP_ISA(vf) __attribute__((vector_size(4 * BP_VW)));
typedef int32_t BP_ISA(vi) __attribute__((vector_size(4 * BP_VW)));
#define VF BP_ISA(vf)
#define VI BP_ISA(vi)
#define LD BP_ISA(ld)
#define ST BP_ISA(st)
BP_TARGET static inline VF LD(const float *p) { VF v; memcpy(&v, p, sizeof v); return v; }
BP_TARGET static inline void ST(float *p, VF v) { memcpy(p, &v, sizeof v); }
#endif

/* Z[r] -= sum_p F[r, p, c] * W[p*C + c]  for r in rows;  out[i] := Z[rows[i]] after it (when out) */
BP_TARGET static void BP_ISA(dense_remove)(float *Z, const float *F, const int64_t *rows, int R, int P, int C,
                                           const float *W, int N, int c, float *out) {
    float buf[BP_GATHER];
    int nzp[BP_GATHER];
    for (int i = 0; i < R; i++) {
        float *z = Z + (size_t)rows[i] * N;
        const float *f = F + (size_t)rows[i] * P * C + c, *g;
        if (i + BP_AHEAD < R)
            bp_prefetch(F + (size_t)rows[i + BP_AHEAD] * P * C + c, P, C, Z + (size_t)rows[i + BP_AHEAD] * N, N);
        g = bp_gather(f, P, C, buf);
        if (g) {  /* the nonzero positions listed first, branch-free (in place: n <= p) */
            int n = 0;
            for (int p = 0; p < P; p++) { nzp[n] = p; buf[n] = g[p]; n += g[p] != 0; }
            for (int q = 0; q < n; q++) {
                const float *w = W + ((size_t)nzp[q] * C + c) * N;
                float v = buf[q];
                for (int j = 0; j < N; j++) z[j] -= v * w[j];
            }
        } else {
            for (int p = 0; p < P; p++) {
                float v = f[(size_t)p * C];
                if (v != 0) {
                    const float *w = W + ((size_t)p * C + c) * N;
                    for (int j = 0; j < N; j++) z[j] -= v * w[j];
                }
            }
        }
        if (out) memcpy(out + (size_t)i * N, z, (size_t)N * sizeof(float));
    }
}

/* Z[r, oy, ox] -= sum_{ky,kx} F[r, oy*sh+ky*dh-pt, ox*sw+kx*dw-pl, c] * K[ky, kx, c]  for r in rows;
   out[i] := Z[rows[i]] after it (when out) */
BP_TARGET static void BP_ISA(conv_remove)(float *Z, const float *F, const int64_t *rows, int R, int H, int W, int C,
                                          int OH, int OW, int CO, const float *K, int KH, int KW, int c, int sh,
                                          int sw, int pt, int pl, int dh, int dw, float *out) {
    size_t zs = (size_t)OH * OW * CO;
    float tv[64], buf[BP_GATHER];
    const float *tk[64];
    for (int i = 0; i < R; i++) {
        float *zr = Z + (size_t)rows[i] * zs;
        const float *f = F + (size_t)rows[i] * H * W * C + c, *g;
        if (i + BP_AHEAD < R)
            bp_prefetch(F + (size_t)rows[i + BP_AHEAD] * H * W * C + c, H * W, C,
                        Z + (size_t)rows[i + BP_AHEAD] * zs, zs);
        g = bp_gather(f, H * W, C, buf);
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                float *z = zr + ((size_t)oy * OW + ox) * CO;
                float *o = out ? out + (size_t)i * zs + ((size_t)oy * OW + ox) * CO : NULL;
                int nt = 0;
                for (int ky = 0; ky < KH; ky++) {
                    int iy = oy * sh + ky * dh - pt;
                    if (iy < 0 || iy >= H) continue;
                    for (int kx = 0; kx < KW; kx++) {
                        int ix = ox * sw + kx * dw - pl;
                        float v;
                        if (ix < 0 || ix >= W) continue;
                        v = g ? g[iy * W + ix] : f[((size_t)iy * W + ix) * C];
                        if (nt == 64) {  /* more taps than the list holds: apply them now */
                            for (int t = 0; t < nt; t++)
                                for (int j = 0; j < CO; j++) z[j] -= tv[t] * tk[t][j];
                            nt = 0;
                        }
                        /* a zero tap is listed and dropped (nt stays): no branch on the data */
                        tv[nt] = v;
                        tk[nt] = K + (((size_t)ky * KW + kx) * C + c) * CO;
                        nt += v != 0;
                    }
                }
                if (nt == 0 && !o) continue;
                /* the position's taps applied in order, a vector of outputs at a time kept in a register, written
                   to Z and out */
                int j = 0;
#if defined(__GNUC__)
                for (; j + BP_VW <= CO; j += BP_VW) {
                    VF a = LD(z + j);
                    for (int t = 0; t < nt; t++) a -= tv[t] * LD(tk[t] + j);
                    ST(z + j, a);
                    if (o) ST(o + j, a);
                }
#endif
                for (; j < CO; j++) {
                    for (int t = 0; t < nt; t++) z[j] -= tv[t] * tk[t][j];
                    if (o) o[j] = z[j];
                }
            }
    }
}

#define VMAX BP_ISA(vmax)
#define PICK BP_ISA(pick)
/* a > b ? a : b lane by lane (a NaN a gives b);  g ? a : b lane by lane */
BP_TARGET static inline VF VMAX(VF a, VF b) { VI c = a > b; return (VF)((c & (VI)a) | (~c & (VI)b)); }
BP_TARGET static inline VF PICK(VI g, VF a, VF b) { return (VF)((g & (VI)a) | (~g & (VI)b)); }

#if BP_SPARSE
#define NV (BP_BLK / BP_VW)          /* vectors per class block */
#define NS (NV >= 8 ? 1 : 8 / NV)    /* independent partial sums of a block: eight accumulators */
#define SUM BP_ISA(sum_block)

/* a[0:NV] += sum_q v[q] * W[nz[q] * stride + 0:BP_BLK], in NS independent sums added up in order */
BP_TARGET static inline void SUM(const float *W, size_t stride, const int *nz, const float *v, int n, VF *a) {
    VF s[NS][NV];
    int q = 0;
    for (int r = 0; r < NS; r++)
        for (int u = 0; u < NV; u++) s[r][u] = r ? (VF){0} : a[u];
    for (; q + NS <= n; q += NS)
        for (int r = 0; r < NS; r++) {
            const float *w = W + (size_t)nz[q + r] * stride;
            float p = v[q + r];
            for (int u = 0; u < NV; u++) s[r][u] += p * LD(w + u * BP_VW);
        }
    for (; q < n; q++) {
        const float *w = W + (size_t)nz[q] * stride;
        float p = v[q];
        for (int u = 0; u < NV; u++) s[0][u] += p * LD(w + u * BP_VW);
    }
    for (int u = 0; u < NV; u++) {
        VF t = s[NS - 1][u];
        for (int r = NS - 2; r >= 0; r--) t = s[r][u] + t;
        a[u] = t;
    }
}

/* out[m] := argmax_j z[j], z = b + sum_{t: H[m,t] != 0} H[m,t] * W[t, j], when the lead over the runner-up
   exceeds tol * (babs + sum_t |H[m,t]| * wabs[t]); else -1.  Wb: W in column blocks (N/BP_BLK, K, BP_BLK),
   N a multiple of BP_BLK (padding classes have b = -inf), 64-byte aligned for whole-line loads.
   nzs: BP_ROWS*(K+16) ints, vals: BP_ROWS*(K+16) floats of scratch. */
BP_TARGET static void BP_ISA(sparse_argmax)(const float *H, int M, int K, const float *Wb, int N, const float *b,
                                            const float *wabs, float babs, float tol, int64_t *out, int *nzs,
                                            float *vals) {
    int cnt[BP_ROWS];
    /* per row, lane l of the vectors of classes seen so far: the best (V1, first met in vector I1 of the row of
       classes) and the runner-up (V2); no logits are stored */
    VF V1[BP_ROWS], V2[BP_ROWS];
    VI I1[BP_ROWS];
    for (int m0 = 0; m0 < M; m0 += BP_ROWS) {
        int mb = M - m0 < BP_ROWS ? M - m0 : BP_ROWS;
        for (int i = 0; i < mb; i++) {  /* the nonzeros */
            cnt[i] = BP_NONZEROS(H + (size_t)(m0 + i) * K, K, nzs + i * (K + 16), vals + i * (K + 16));
            V1[i] = V2[i] = (VF){0} - INFINITY;
            I1[i] = (VI){0};
        }
        for (int j0 = 0; j0 < N; j0 += BP_BLK) {
            const float *Wj = Wb + (size_t)j0 * K;
            for (int i = 0; i < mb; i++) {
                VF a[NV], v1 = V1[i], v2 = V2[i];
                VI i1 = I1[i], g;
                for (int u = 0; u < NV; u++) a[u] = LD(b + j0 + u * BP_VW);
                SUM(Wj, BP_BLK, nzs + i * (K + 16), vals + i * (K + 16), cnt[i], a);
                /* lane-wise top two, vector by vector in class order; strictly greater, so that I1 keeps a lane's
                   first vector and an equal value becomes the runner-up (a tie gives lead 0) */
                for (int u = 0; u < NV; u++) {
                    g = a[u] > v1; v2 = VMAX(PICK(g, v1, a[u]), v2); v1 = PICK(g, a[u], v1);
                    i1 = (g & ((VI){0} + (j0 / BP_VW + u))) | (~g & i1);
                }
                V1[i] = v1; V2[i] = v2; I1[i] = i1;
            }
        }
        for (int i = 0; i < mb; i++) {  /* best (its first class) and runner-up over the lanes */
            float t1[BP_VW], t2[BP_VW], mx = -INFINITY, sv = -INFINITY, s = babs;
            int c1[BP_VW], a = -1, L = -1;
            memcpy(t1, &V1[i], sizeof t1);
            memcpy(t2, &V2[i], sizeof t2);
            memcpy(c1, &I1[i], sizeof c1);
            for (int l = 0; l < BP_VW; l++) {
                int j = c1[l] * BP_VW + l;
                if (t1[l] > mx || (t1[l] == mx && L >= 0 && j < a)) { mx = t1[l]; a = j; L = l; }
            }
            for (int l = 0; l < BP_VW; l++) {
                sv = t2[l] > sv ? t2[l] : sv;
                if (l != L) sv = t1[l] > sv ? t1[l] : sv;
            }
            if (L < 0) { out[m0 + i] = -1; continue; }  /* no value above -inf */
            /* a NaN logit never enters V1 and never replaces a value of V2 (VMAX keeps its second argument
               unless the first is greater); with finite W and b it means an inf or NaN product, so the bound
               is inf or NaN too and the row is declined */
            for (int q = 0; q < cnt[i]; q++) s += fabsf(vals[i * (K + 16) + q]) * wabs[nzs[i * (K + 16) + q]];
            /* the absolute term covers products that underflow (the relative bound does not) */
            out[m0 + i] = mx - sv > tol * s + (K + 2) * FLT_MIN ? a : -1;
        }
    }
}

/* Y[m] := b + sum_{t: X[m,t] != 0} X[m,t] * W[t, :]  (W row-major (K, N); nz, vals: K + 16 ints / floats of
   scratch); returns 0 without writing Y when X has more than max_nz nonzeros */
BP_TARGET static int BP_ISA(sparse_dense)(const float *X, int M, int K, const float *W, int N, const float *b,
                                          float *Y, double max_nz, int *nz, float *vals) {
    size_t total = 0;
    for (size_t t = 0; t < (size_t)M * K; t++) total += X[t] != 0;
    if ((double)total > max_nz) return 0;
    for (int m = 0; m < M; m++) {
        const float *x = X + (size_t)m * K;
        float *y = Y + (size_t)m * N;
        /* the columns' sums are the same in every instance: one running sum for columns below N1, four (by q mod 4)
           below N2, one scalar sum after */
        int n = BP_NONZEROS(x, K, nz, vals), j0 = 0, N1 = N / 128 * 128, N2 = N / 16 * 16;
        for (; j0 < N1; j0 += 8 * BP_VW) {  /* eight vectors of columns, a sum each */
            VF a[8];
            for (int u = 0; u < 8; u++) a[u] = LD(b + j0 + u * BP_VW);
            for (int q = 0; q < n; q++) {
                const float *w = W + (size_t)nz[q] * N + j0;
                float p = vals[q];
                for (int u = 0; u < 8; u++) a[u] += p * LD(w + u * BP_VW);
            }
            for (int u = 0; u < 8; u++) ST(y + j0 + u * BP_VW, a[u]);
        }
        for (; j0 < N2; j0 += BP_VW) {  /* one vector of columns, four sums added up as a + (c + (d + e)) */
            VF a = LD(b + j0), c = {0}, d = {0}, e = {0};
            int q = 0;
            for (; q + 4 <= n; q += 4) {
                a += vals[q] * LD(W + (size_t)nz[q] * N + j0);
                c += vals[q + 1] * LD(W + (size_t)nz[q + 1] * N + j0);
                d += vals[q + 2] * LD(W + (size_t)nz[q + 2] * N + j0);
                e += vals[q + 3] * LD(W + (size_t)nz[q + 3] * N + j0);
            }
            for (; q < n; q++) a += vals[q] * LD(W + (size_t)nz[q] * N + j0);
            ST(y + j0, a + (c + (d + e)));
        }
        for (; j0 < N; j0++) {
            float a = b[j0];
            for (int q = 0; q < n; q++) a += vals[q] * W[(size_t)nz[q] * N + j0];
            y[j0] = a;
        }
    }
    return 1;
}
#undef NV
#undef NS
#undef SUM
#endif  /* BP_SPARSE */

#ifdef BP_FMA  /* the trunk kernel: sums in oneDNN's order need a fused multiply-add */
#include "_trunk.h"
#undef BP_FMA
#undef BP_SET1
#endif

#undef VMAX
#undef PICK
#undef VF
#undef VI
#undef LD
#undef ST
/* this instance's parameters, consumed */
#undef BP_ISA
#undef BP_TARGET
#undef BP_VW
#undef BP_SPARSE
#undef BP_NONZEROS

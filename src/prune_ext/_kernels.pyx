# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Low-level kernels of the pruning sweep: numpy buffers in, numpy buffers out, BLAS through scipy.

Layout conventions (all C-contiguous, rows = samples):
  feature maps  X[n, y, x, c]   (channels-last, like Keras)
  matrices      A[m, k]         (row-major)

Each ``cdef ... nogil`` core has a one-line formula docstring; the ``cpdef`` functions are the memoryview entry
points that ``badprune.head`` calls. No TensorFlow here.

Threads: the loops here are serial and release the GIL. ``badprune.head.MaskedSweep`` runs shards of the samples
in Python threads with OpenBLAS single-threaded (measured on 2 cores: an OpenMP pool next to OpenBLAS's threads made
both spin against each other, GEMM 100 -> 30 GFLOP/s).
"""
from libc.math cimport exp, expf, tanhf, erff, log1p, INFINITY
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm, dgemm

import os

import numpy as np
cimport numpy as cnp

cnp.import_array()

ctypedef fused floating:
    float
    double

# activation kinds (the names are the keys of ACTIVATIONS, used by badprune.head)
cdef enum:
    ACT_LINEAR = 0
    ACT_RELU = 1
    ACT_SIGMOID = 2
    ACT_TANH = 3
    ACT_ELU = 4
    ACT_SOFTMAX = 5
    ACT_RELU_GENERAL = 6
    ACT_SILU = 7
    ACT_GELU = 8
    ACT_SOFTPLUS = 9
    ACT_SELU = 10
    ACT_GELU_TANH = 11
    ACT_HARD_SIGMOID = 12

ACTIVATIONS = {
    "linear": ACT_LINEAR, "relu": ACT_RELU, "sigmoid": ACT_SIGMOID, "tanh": ACT_TANH, "elu": ACT_ELU,
    "softmax": ACT_SOFTMAX, "relu_general": ACT_RELU_GENERAL, "silu": ACT_SILU, "swish": ACT_SILU,
    "gelu": ACT_GELU, "softplus": ACT_SOFTPLUS, "selu": ACT_SELU, "gelu_tanh": ACT_GELU_TANH,
    "hard_sigmoid": ACT_HARD_SIGMOID,
}


# --------------------------------------------------------------------------------------------------------------
# GEMM
# --------------------------------------------------------------------------------------------------------------
cdef void _gemm(int M, int N, int K, floating alpha, const floating* A, int lda, const floating* B, int ldb,
                floating beta, floating* C, int ldc) noexcept nogil:
    """C := alpha*A.B + beta*C  (row-major; A (M,K), B (K,N), C (M,N))"""
    # row-major C = A.B is column-major C^T = B^T.A^T
    cdef char n = b'N'
    if M == 0 or N == 0:
        return
    if floating is float:
        sgemm(&n, &n, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda, &beta, C, &ldc)
    else:
        dgemm(&n, &n, &N, &M, &K, &alpha, <double*>B, &ldb, <double*>A, &lda, &beta, C, &ldc)


cpdef void gemm(const floating[:, ::1] A, const floating[:, ::1] B, floating[:, ::1] C, floating beta=0):
    """C := A.B + beta*C"""
    if A.shape[1] != B.shape[0] or C.shape[0] != A.shape[0] or C.shape[1] != B.shape[1]:
        raise ValueError("gemm: shapes do not match")
    with nogil:
        _gemm(<int>A.shape[0], <int>B.shape[1], <int>A.shape[1], <floating>1, &A[0, 0] if A.shape[0] else NULL,
              <int>A.shape[1], &B[0, 0], <int>B.shape[1], beta, &C[0, 0] if C.shape[0] else NULL,
              <int>C.shape[1])


cpdef void dense(const float[:, ::1] X, const float[:, ::1] W, const float[::1] b, float[:, ::1] Y):
    """Y := X.W + b"""
    cdef Py_ssize_t m, j, M = X.shape[0], N = W.shape[1]
    if X.shape[1] != W.shape[0] or Y.shape[0] != M or Y.shape[1] != N or b.shape[0] != N:
        raise ValueError("dense: shapes do not match")
    if M == 0:
        return
    with nogil:
        for m in range(M):
            for j in range(N):
                Y[m, j] = b[j]
        _gemm(<int>M, <int>N, <int>X.shape[1], <float>1, &X[0, 0], <int>X.shape[1], &W[0, 0], <int>N,
              <float>1, &Y[0, 0], <int>N)


# --------------------------------------------------------------------------------------------------------------
# Convolution (im2col + GEMM) and pooling, channels-last
# --------------------------------------------------------------------------------------------------------------
cdef void _im2col(const float* x, int H, int W, int C, int KH, int KW, int SH, int SW, int PT, int PL,
                  int DH, int DW, int OH, int OW, float* col) noexcept nogil:
    """col[(oy*OW+ox), (ky*KW+kx)*C + c] := x[oy*SH+ky*DH-PT, ox*SW+kx*DW-PL, c]  (0 outside the image)"""
    cdef int oy, ox, ky, kx, c, iy, ix
    cdef float* dst
    cdef const float* src
    for oy in range(OH):
        for ox in range(OW):
            dst = col + (<Py_ssize_t>oy * OW + ox) * (<Py_ssize_t>KH * KW * C)
            for ky in range(KH):
                iy = oy * SH + ky * DH - PT
                for kx in range(KW):
                    ix = ox * SW + kx * DW - PL
                    if iy < 0 or iy >= H or ix < 0 or ix >= W:
                        for c in range(C):
                            dst[c] = 0
                    else:
                        src = x + (<Py_ssize_t>iy * W + ix) * C
                        for c in range(C):
                            dst[c] = src[c]
                    dst += C


cpdef void conv2d(const float[:, :, :, ::1] X, const float[:, :, :, ::1] K, const float[::1] b,
                  int sh, int sw, int pt, int pl, int dh, int dw, float[:, :, :, ::1] Y):
    """Y[n] := conv(X[n], K, stride (sh, sw), top/left padding (pt, pl), dilation (dh, dw)) + b"""
    cdef Py_ssize_t INT_LIMIT = 2147483647
    # every size and product below (BLAS takes int dimensions, _im2col int coordinates) must fit an int
    if X.shape[1] * X.shape[2] * X.shape[3] > INT_LIMIT or Y.shape[1] * Y.shape[2] * K.shape[0] * K.shape[1] \
            * X.shape[3] > INT_LIMIT or K.shape[3] > INT_LIMIT or Y.shape[1] * Y.shape[2] * K.shape[3] > INT_LIMIT \
            or X.shape[0] > INT_LIMIT:
        raise ValueError("conv2d: an image, its output or its im2col columns exceed 2^31 values")
    cdef int M = <int>X.shape[0], H = <int>X.shape[1], W = <int>X.shape[2], C = <int>X.shape[3]
    cdef int KH = <int>K.shape[0], KW = <int>K.shape[1], CO = <int>K.shape[3]
    cdef int OH = <int>Y.shape[1], OW = <int>Y.shape[2]
    cdef Py_ssize_t KK = <Py_ssize_t>KH * KW * C, P = <Py_ssize_t>OH * OW, block
    cdef int lo, n, i, j
    cdef float* col
    if K.shape[2] != C or Y.shape[3] != CO or Y.shape[0] != M or b.shape[0] != CO:
        raise ValueError("conv2d: shapes do not match")
    if M == 0:
        return
    block = max(1, min(<Py_ssize_t>M, (1 << 22) // max(1, P * KK)))  # ~16 MB of columns per block
    block = min(block, INT_LIMIT // max(1, P))  # block * P rows in one GEMM
    col = <float*>malloc(<size_t>block * P * KK * sizeof(float))
    if col == NULL:
        raise MemoryError()
    try:
        with nogil:
            lo = 0
            while lo < M:
                if lo + block > M:
                    block = M - lo
                for n in range(block):
                    _im2col(&X[lo + n, 0, 0, 0], H, W, C, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW,
                            col + <size_t>n * P * KK)
                    for i in range(P):
                        for j in range(CO):
                            Y[lo + n, i // OW, i % OW, j] = b[j]
                _gemm(<int>(block * P), CO, <int>KK, <float>1, col, <int>KK, &K[0, 0, 0, 0], CO, <float>1,
                      &Y[lo, 0, 0, 0], CO)
                lo += block
    finally:
        free(col)


cpdef void pool2d(const float[:, :, :, ::1] X, int ph, int pw, int sh, int sw, int pt, int pl, bint average,
                  float[:, :, :, ::1] Y):
    """Y[n, oy, ox, c] := max (or mean) of X[n, window(oy, ox), c] over the in-image part of the window"""
    cdef Py_ssize_t M = X.shape[0], H = X.shape[1], W = X.shape[2], C = X.shape[3]
    cdef Py_ssize_t OH = Y.shape[1], OW = Y.shape[2], n, oy, ox, c, ky, kx, iy, ix, cnt
    cdef float v, acc
    if Y.shape[3] != C or Y.shape[0] != M:
        raise ValueError("pool2d: shapes do not match")
    with nogil:
        for n in range(M):
            for oy in range(OH):
                for ox in range(OW):
                    for c in range(C):
                        acc = 0 if average else -INFINITY
                        cnt = 0
                        for ky in range(ph):
                            iy = oy * sh + ky - pt
                            if iy < 0 or iy >= H:
                                continue
                            for kx in range(pw):
                                ix = ox * sw + kx - pl
                                if ix < 0 or ix >= W:
                                    continue
                                v = X[n, iy, ix, c]
                                cnt = cnt + 1
                                if average:
                                    acc = acc + v
                                elif v > acc:
                                    acc = v
                        if average:
                            Y[n, oy, ox, c] = acc / cnt if cnt > 0 else 0
                        else:
                            Y[n, oy, ox, c] = acc


# --------------------------------------------------------------------------------------------------------------
# Element-wise: activations, per-channel affine (BatchNormalization)
# --------------------------------------------------------------------------------------------------------------
cdef inline float _act(float x, int kind, float p0, float p1, float p2) noexcept nogil:
    """y := f_kind(x)  (p0, p1, p2: negative slope, max value, threshold for the general ReLU; alpha for ELU)"""
    cdef float y
    if kind == ACT_RELU:
        return x if x > 0 else 0
    elif kind == ACT_SIGMOID:
        return 1 / (1 + expf(-x))
    elif kind == ACT_TANH:
        return tanhf(x)
    elif kind == ACT_ELU:
        return x if x > 0 else p0 * (expf(x) - 1)
    elif kind == ACT_RELU_GENERAL:
        if x >= p1:
            y = p1
        elif x >= p2:
            y = x
        else:
            y = p0 * (x - p2)
        return y
    elif kind == ACT_SILU:
        return x / (1 + expf(-x))
    elif kind == ACT_GELU:
        return 0.5 * x * (1 + erff(x * 0.7071067811865476))
    elif kind == ACT_GELU_TANH:
        return 0.5 * x * (1 + tanhf(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif kind == ACT_SOFTPLUS:
        return x + <float>log1p(exp(-x)) if x > 0 else <float>log1p(exp(x))
    elif kind == ACT_SELU:
        return 1.0507009873554805 * (x if x > 0 else 1.6732632423543772 * (expf(x) - 1))
    elif kind == ACT_HARD_SIGMOID:
        y = x / 6 + 0.5
        return 0 if y < 0 else (1 if y > 1 else y)
    return x


cpdef void activation(float[:, ::1] X, int kind, float p0=0, float p1=INFINITY, float p2=0):
    """X := f_kind(X) in place; softmax runs over the last axis (X viewed as (rows, classes))"""
    cdef Py_ssize_t M = X.shape[0], N = X.shape[1], m, j, i, T = M * N
    cdef float mx, s
    cdef float* p
    if kind == ACT_LINEAR or M == 0 or N == 0:
        return
    p = &X[0, 0]
    with nogil:
        if kind == ACT_SOFTMAX:
            for m in range(M):
                mx = -INFINITY
                for j in range(N):
                    if X[m, j] > mx:
                        mx = X[m, j]
                s = 0
                for j in range(N):
                    X[m, j] = expf(X[m, j] - mx)
                    s = s + X[m, j]
                for j in range(N):
                    X[m, j] = X[m, j] / s
        elif kind == ACT_RELU:
            for i in range(T):
                p[i] = p[i] if p[i] > 0 else 0  # branch-free: the compiler vectorizes it
        else:
            for i in range(T):
                p[i] = _act(p[i], kind, p0, p1, p2)


cpdef void affine_channels(float[:, ::1] X, const float[::1] scale, const float[::1] shift):
    """X[m, c] := X[m, c]*scale[c] + shift[c]  (X viewed as (positions, channels))"""
    cdef Py_ssize_t M = X.shape[0], C = X.shape[1], m, c
    if scale.shape[0] != C or shift.shape[0] != C:
        raise ValueError("affine_channels: shapes do not match")
    with nogil:
        for m in range(M):
            for c in range(C):
                X[m, c] = X[m, c] * scale[c] + shift[c]


# --------------------------------------------------------------------------------------------------------------
# Sweep helpers: ranking statistics, activity, incremental updates of linear consumers, argmax
# --------------------------------------------------------------------------------------------------------------
cpdef cnp.ndarray channel_means(const floating[:, ::1] F):
    """mean[c] := sum_m F[m, c] / M  (F viewed as (samples*positions, channels); float64 accumulation)"""
    cdef Py_ssize_t M = F.shape[0], C = F.shape[1], m, c, t, T = 64
    cdef cnp.ndarray[cnp.float64_t, ndim=2] part = np.zeros((T, C), np.float64)
    cdef double[:, ::1] pv = part
    cdef Py_ssize_t chunk = (M + T - 1) // T
    with nogil:
        for t in range(T):
            for m in range(t * chunk, min(M, (t + 1) * chunk)):
                for c in range(C):
                    pv[t, c] += F[m, c]
    return part.sum(axis=0) / max(M, 1)


cpdef cnp.ndarray channel_activity(const float[:, :, ::1] F):
    """active[n, c] := 1 if any F[n, p, c] != 0 else 0  (F viewed as (samples, positions, channels))"""
    cdef Py_ssize_t N = F.shape[0], P = F.shape[1], C = F.shape[2], n, p, c
    cdef cnp.ndarray[cnp.uint8_t, ndim=2] out = np.zeros((N, C), np.uint8)
    cdef unsigned char[:, ::1] o = out
    with nogil:
        for n in range(N):
            for p in range(P):
                for c in range(C):
                    if F[n, p, c] != 0:
                        o[n, c] = 1
    return out


cdef extern from *:
    """
    /* The vector kernels (channel removal here, the sparse final layer below) are written once, in _simd.h, for a
       vector of BP_VW floats, and built once per instruction set: AVX-512F (16 floats), AVX2 + FMA (8) and the
       portable 128-bit one (4), with GCC or clang on x86-64; elsewhere the portable one only. bp_init_isa picks
       the best for the CPU at import; the sparse kernels need AVX2 or AVX-512 (see SPARSE_VECTORIZED). */
    #include <math.h>
    #include <string.h>
    #include <stdint.h>
    #include <float.h>
    #if defined(__GNUC__) && defined(__x86_64__) && !defined(_WIN32)
    /* not on Windows: GCC there moves 32- and 64-byte vectors to and from 16-byte-aligned stack slots (GCC bug 54412) */
    #define BP_X86 1
    #include <immintrin.h>
    #pragma GCC diagnostic ignored "-Wpsabi"
    #else
    #define BP_X86 0
    #endif
    #define BP_BLK 64   /* classes per column block of the sparse argmax: W's block (K x 64 floats) */
    #define BP_ROWS 16  /* rows swept over each block while it is in cache */
    #define BP_TR_PAD 128  /* floats after each plane of the trunk kernel (_trunk.h): over-reads of 4 vectors + KW */

    /* Channel c of a row is spread over its positions, one cache line each, in rows met in no useful order. Reading
       them as the taps are met puts a branch on each load (a zero tap is skipped), and a mispredicted one waits for
       its miss before the next is issued. So the channel's values are first gathered into a local array (independent
       loads, their misses overlapped), and the next rows' lines are prefetched while this one is worked on. */
    #define BP_GATHER 1024  /* positions gathered per row; a larger input is read in place */
    #define BP_AHEAD 2      /* rows prefetched ahead */
    static inline const float *bp_gather(const float *f, int P, int C, float *buf) {
        if (P > BP_GATHER) return NULL;
        for (int p = 0; p < P; p++) buf[p] = f[(size_t)p * C];
        return buf;
    }
    /* the first 64 positions of f's channel (stride C) and the first 1,024 floats of z, into the cache */
    static inline void bp_prefetch(const float *f, int P, int C, const float *z, size_t zn) {
    #if defined(__GNUC__)
        for (int p = 0; p < P && p < 64; p++) __builtin_prefetch(f + (size_t)p * C);
        for (size_t t = 0; t < zn && t < 1024; t += 16) __builtin_prefetch(z + t, 1);
    #endif
    }

    /* the nonzeros of x[0:K] into nz / vals (K + 16 of room), their count returned; branch-free */
    static inline int bp_nonzeros_plain(const float *x, int K, int *nz, float *vals) {
        int n = 0;
        for (int t = 0; t < K; t++) { nz[n] = t; vals[n] = x[t]; n += x[t] != 0; }
        return n;
    }

    /* the portable instance: 128-bit vectors (SSE2 is part of x86-64; NEON of arm64) */
    #define BP_ISA(f) bp_##f##_base
    #define BP_TARGET
    #define BP_VW 4
    #define BP_SPARSE 0
    #include "_simd.h"

    #if BP_X86
    __attribute__((target("avx512f")))
    static inline int bp_nonzeros_avx512(const float *x, int K, int *nz, float *vals) {  /* 16 at a time */
        int n = 0, t = 0;
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; t + 16 <= K; t += 16) {
            __m512 v = _mm512_loadu_ps(x + t);
            __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);  /* as x != 0: NaN counts */
            _mm512_storeu_ps(vals + n, _mm512_maskz_compress_ps(m, v));
            _mm512_storeu_si512((void *)(nz + n), _mm512_maskz_compress_epi32(m, idx));
            n += __builtin_popcount(m);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        }
        for (; t < K; t++) { nz[n] = t; vals[n] = x[t]; n += x[t] != 0; }
        return n;
    }
    #define BP_ISA(f) bp_##f##_avx2
    #define BP_TARGET __attribute__((target("avx2,fma")))
    #define BP_VW 8
    #define BP_SPARSE 1
    #define BP_NONZEROS bp_nonzeros_plain
    #define BP_FMA(a, b, c) ((VF)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
    #define BP_SET1(s) ((VF)_mm256_set1_ps(s))
    #include "_simd.h"
    #define BP_ISA(f) bp_##f##_avx512
    #define BP_TARGET __attribute__((target("avx512f")))
    #define BP_VW 16
    #define BP_SPARSE 1
    #define BP_NONZEROS bp_nonzeros_avx512
    #define BP_FMA(a, b, c) ((VF)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))
    #define BP_SET1(s) ((VF)_mm512_set1_ps(s))
    #include "_simd.h"
    #endif

    /* the instance in use (set once, by bp_init_isa at import) */
    static void (*bp_dense_remove)(float *, const float *, const int64_t *, int, int, int, const float *, int, int,
                                   float *) = bp_dense_remove_base;
    static void (*bp_conv_remove)(float *, const float *, const int64_t *, int, int, int, int, int, int, int,
                                  const float *, int, int, int, int, int, int, int, int, int, float *)
        = bp_conv_remove_base;
    static void (*bp_sparse_argmax)(const float *, int, int, const float *, int, const float *, const float *, float,
                                    float, int64_t *, int *, float *) = NULL;
    static int (*bp_sparse_dense)(const float *, int, int, const float *, int, const float *, float *, double, int *,
                                  float *) = NULL;
    static void (*bp_trunk)(const float *, int, int, int, int, int, const int *, const float *const *,
                            const float *const *, float *, float *, size_t) = NULL;
    /* the best instance for this CPU up to level cap (2: AVX-512, 1: AVX2, 0: the portable one); returns the level
       chosen */
    static int bp_init_isa(int cap) {
    #if BP_X86
        __builtin_cpu_init();
        if (cap >= 2 && __builtin_cpu_supports("avx512f")) {
            bp_dense_remove = bp_dense_remove_avx512; bp_conv_remove = bp_conv_remove_avx512;
            bp_sparse_argmax = bp_sparse_argmax_avx512; bp_sparse_dense = bp_sparse_dense_avx512;
            bp_trunk = bp_trunk_avx512;
            return 2;
        }
        if (cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            bp_dense_remove = bp_dense_remove_avx2; bp_conv_remove = bp_conv_remove_avx2;
            bp_sparse_argmax = bp_sparse_argmax_avx2; bp_sparse_dense = bp_sparse_dense_avx2;
            bp_trunk = bp_trunk_avx2;
            return 1;
        }
    #endif
        return 0;
    }
    /* the trunk kernel with denormals flushed (inputs and results), as TensorFlow runs its kernels; 0 when the
       instance has none */
    static int bp_trunk_run(const float *X, int N, int H, int W, int C, int nl, const int *spec,
                            const float *const *Ks, const float *const *Bs, float *Y, float *buf, size_t bufn) {
        if (!bp_trunk) return 0;
    #if BP_X86
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);  /* FTZ | DAZ */
        bp_trunk(X, N, H, W, C, nl, spec, Ks, Bs, Y, buf, bufn);
        _mm_setcsr(csr);
    #endif
        return 1;
    }
    """
    int BP_BLK
    int BP_ROWS
    int BP_TR_PAD
    int _trunk_run "bp_trunk_run"(const float* X, int N, int H, int W, int C, int nl, const int* spec,
                                  const float* const* Ks, const float* const* Bs, float* Y, float* buf,
                                  size_t bufn) noexcept nogil
    int _init_isa "bp_init_isa"(int cap) noexcept nogil
    void _dense_remove "bp_dense_remove"(float* Z, const float* F, const cnp.int64_t* rows, int R, int P, int C,
                                         const float* W, int N, int c, float* out) noexcept nogil
    void _conv_remove "bp_conv_remove"(float* Z, const float* F, const cnp.int64_t* rows, int R, int H, int W,
                                       int C, int OH, int OW, int CO, const float* K, int KH, int KW, int c, int sh,
                                       int sw, int pt, int pl, int dh, int dw, float* out) noexcept nogil
    void _sparse_argmax "bp_sparse_argmax"(const float* H, int M, int K, const float* Wb, int N, const float* b,
                                           const float* wabs, float babs, float tol, cnp.int64_t* out, int* nzs,
                                           float* vals) noexcept nogil
    int _sparse_dense "bp_sparse_dense"(const float* X, int M, int K, const float* W, int N, const float* b,
                                        float* Y, double max_nz, int* nz, float* vals) noexcept nogil


#: the vector kernels' instruction set in use: the best the CPU has, or a lower one named by the environment
#: variable PRUNE_EXT_ISA ("avx2" or "base"; for tests and comparisons; any other value is ignored)
cdef int _level = _init_isa({"base": 0, "avx2": 1}.get(os.environ.get("PRUNE_EXT_ISA", ""), 2))
ISA = ("base", "avx2", "avx512")[_level]
#: whether the sparse final-layer kernels run vectorized (AVX2 or AVX-512; else :func:`sparse_argmax` declines
#: every row and :func:`sparse_dense` every batch: a GEMM is faster)
SPARSE_VECTORIZED = ISA != "base"
SPARSE_BLOCK = BP_BLK


cdef int _check_rows(const cnp.int64_t[::1] rows, Py_ssize_t n, str name) except -1:
    """IndexError unless every row is in [0, n)."""
    cdef Py_ssize_t i
    for i in range(rows.shape[0]):
        if not 0 <= rows[i] < n:
            raise IndexError(f"{name}: a row is out of range")
    return 0


cpdef void dense_remove_channel(float[:, ::1] Z, const float[:, :, ::1] F, const cnp.int64_t[::1] rows,
                                const float[:, ::1] W, int c, float[:, ::1] out=None):
    """Z[r] -= sum_p F[r, p, c] * W[p*C + c]  for r in rows  (Z: pre-activations of a Dense on flatten(F));
    out[i] := Z[rows[i]] after it, when given"""
    cdef Py_ssize_t R = rows.shape[0], P = F.shape[1], C = F.shape[2], N = W.shape[1]
    cdef float* o = NULL
    if W.shape[0] != P * C or Z.shape[1] != N or Z.shape[0] != F.shape[0] or not 0 <= c < C:
        raise ValueError("dense_remove_channel: shapes do not match")
    if out is not None:
        if out.shape[0] != R or out.shape[1] != N:
            raise ValueError("dense_remove_channel: out must be (len(rows), units)")
        if R:
            o = &out[0, 0]
    _check_rows(rows, Z.shape[0], "dense_remove_channel")
    if R == 0 or N == 0:
        return
    with nogil:
        _dense_remove(&Z[0, 0], &F[0, 0, 0], &rows[0], <int>R, <int>P, <int>C, &W[0, 0], <int>N, c, o)


cpdef void conv_remove_channel(float[:, :, :, ::1] Z, const float[:, :, :, ::1] F, const cnp.int64_t[::1] rows,
                               const float[:, :, :, ::1] K, int c, int sh, int sw, int pt, int pl, int dh, int dw,
                               float[:, :, :, ::1] out=None):
    """Z[r, oy, ox] -= sum_{ky,kx} F[r, oy*sh+ky*dh-pt, ox*sw+kx*dw-pl, c] * K[ky, kx, c]  for r in rows;
    out[i] := Z[rows[i]] after it, when given"""
    cdef Py_ssize_t R = rows.shape[0]
    cdef Py_ssize_t OH = Z.shape[1], OW = Z.shape[2], CO = Z.shape[3]
    cdef float* o = NULL
    if K.shape[3] != CO or K.shape[2] != F.shape[3] or Z.shape[0] != F.shape[0] or not 0 <= c < F.shape[3]:
        raise ValueError("conv_remove_channel: shapes do not match")
    if out is not None:
        if out.shape[0] != R or out.shape[1] != OH or out.shape[2] != OW or out.shape[3] != CO:
            raise ValueError("conv_remove_channel: out must be (len(rows),) + Z's sample shape")
        if R:
            o = &out[0, 0, 0, 0]
    _check_rows(rows, Z.shape[0], "conv_remove_channel")
    if R == 0 or OH * OW * CO == 0:
        return
    with nogil:
        _conv_remove(&Z[0, 0, 0, 0], &F[0, 0, 0, 0], &rows[0], <int>R, <int>F.shape[1], <int>F.shape[2],
                     <int>F.shape[3], <int>OH, <int>OW, <int>CO, &K[0, 0, 0, 0], <int>K.shape[0], <int>K.shape[1],
                     c, sh, sw, pt, pl, dh, dw, o)


# The scans over a row of logits, with SSE (part of every x86-64) where the compiler has it: GCC does not vectorize
# float max loops without -ffast-math. _mm_max_ps(x, m) is exactly ``x if x > m else m`` lane by lane.
cdef extern from *:
    """
    #if defined(__SSE__)
    #include <xmmintrin.h>
    #endif
    /* the max of x[0:n] by the rule m = x[j] > m ? x[j] : m from m = x[0] (a NaN never enters unless x[0] is one) */
    static inline float bp_row_max(const float *x, Py_ssize_t n) {
        float mx = x[0];
        Py_ssize_t j = 0;
    #if defined(__SSE__)
        __m128 a = _mm_set1_ps(mx), b = a, c = a, d = a;
        for (; j + 16 <= n; j += 16) {
            a = _mm_max_ps(_mm_loadu_ps(x + j), a);
            b = _mm_max_ps(_mm_loadu_ps(x + j + 4), b);
            c = _mm_max_ps(_mm_loadu_ps(x + j + 8), c);
            d = _mm_max_ps(_mm_loadu_ps(x + j + 12), d);
        }
        float t[16];
        _mm_storeu_ps(t, a); _mm_storeu_ps(t + 4, b); _mm_storeu_ps(t + 8, c); _mm_storeu_ps(t + 12, d);
        for (int l = 0; l < 16; l++) mx = t[l] > mx ? t[l] : mx;
    #endif
        for (; j < n; j++) mx = x[j] > mx ? x[j] : mx;
        return mx;
    }
    /* the first j < n with x[j] == v, else -1 */
    static inline Py_ssize_t bp_first_equal(const float *x, Py_ssize_t n, float v) {
        Py_ssize_t j = 0;
    #if defined(__SSE__)
        __m128 t = _mm_set1_ps(v);
        for (; j + 16 <= n; j += 16) {
            __m128 e = _mm_or_ps(_mm_or_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + j), t),
                                           _mm_cmpeq_ps(_mm_loadu_ps(x + j + 4), t)),
                                 _mm_or_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + j + 8), t),
                                           _mm_cmpeq_ps(_mm_loadu_ps(x + j + 12), t)));
            if (_mm_movemask_ps(e)) break;
        }
    #endif
        for (; j < n; j++) if (x[j] == v) return j;
        return -1;
    }
    """
    float _row_max "bp_row_max"(const float* x, Py_ssize_t n) noexcept nogil
    Py_ssize_t _first_equal "bp_first_equal"(const float* x, Py_ssize_t n, float v) noexcept nogil


cdef inline Py_ssize_t _argmax(const float* x, Py_ssize_t n) noexcept nogil:
    """argmax_j x[j]  (first maximum)"""
    cdef Py_ssize_t j, best = 0
    cdef float bv = x[0], mx = _row_max(x, n)  # branch-free max first, then find its first position
    if mx == bv:
        return 0
    j = _first_equal(x, n, mx)
    if j >= 0:
        return j
    for j in range(1, n):  # NaN present: fall back to the plain scan
        if x[j] > bv:
            bv = x[j]
            best = j
    return best


cpdef cnp.ndarray argmax_rows(const float[:, ::1] X):
    """out[m] := argmax_j X[m, j]  (first maximum, like numpy and TensorFlow)"""
    cdef Py_ssize_t M = X.shape[0], N = X.shape[1], m
    cdef cnp.ndarray[cnp.int64_t, ndim=1] out = np.empty(M, np.int64)
    cdef cnp.int64_t[::1] o = out
    if M == 0:
        return out
    if N == 0:
        raise ValueError("argmax_rows: the rows have no columns (no class to pick)")
    with nogil:
        for m in range(M):
            o[m] = _argmax(&X[m, 0], N)
    return out


# --------------------------------------------------------------------------------------------------------------
# A final Dense layer on sparse inputs (ReLU outputs): the argmax over its nonzeros, proven against rounding
# --------------------------------------------------------------------------------------------------------------
# The kernels are in _simd.h (see the channel-removal cores above). Without AVX2 the final layer is a GEMM.


cpdef cnp.ndarray sparse_argmax(const float[:, ::1] H, const float[:, :, ::1] Wb, const float[::1] b,
                                const float[::1] wabs, float babs, float tol):
    """out[m] := argmax_j (b + H[m].W)[j] summed over H[m]'s nonzeros, if its lead over the runner-up exceeds
    tol * (babs + sum_t |H[m, t]| * wabs[t]) + (K+2) * FLT_MIN, else -1   (W given as Wb[j // B, t, j % B],
    B = SPARSE_BLOCK, best 64-byte aligned; without vector code, see SPARSE_VECTORIZED, always -1)

    With |b_j| <= babs, |W[t, j]| <= wabs[t] and tol >= 4 * gamma_(K+2) (gamma_n = n*u / (1 - n*u), u = 2^-24),
    a label given is the argmax of the exact real logits, and of any float32 evaluation of them in any order
    (each logit is within tol/4 * (babs + ...) of its real value): the same label as ``dense`` + ``argmax_rows``.
    """
    cdef Py_ssize_t M = H.shape[0], K = H.shape[1], N = Wb.shape[0] * Wb.shape[2]
    cdef cnp.ndarray[cnp.int64_t, ndim=1] out = np.empty(M, np.int64)
    cdef int* nz
    cdef float* vals
    if Wb.shape[1] != K or Wb.shape[2] != BP_BLK or b.shape[0] != N or wabs.shape[0] != K:
        raise ValueError("sparse_argmax: shapes do not match")
    if M == 0:
        return out
    if K == 0 or N == 0:
        raise ValueError("sparse_argmax: no inputs or no classes")
    if _level == 0:  # no sparse kernel built or chosen (SPARSE_VECTORIZED is False)
        out.fill(-1)
        return out
    nz = <int*>malloc(BP_ROWS * (K + 16) * sizeof(int))
    vals = <float*>malloc(BP_ROWS * (K + 16) * sizeof(float))
    if nz == NULL or vals == NULL:
        free(nz)
        free(vals)
        raise MemoryError()
    with nogil:
        _sparse_argmax(&H[0, 0], <int>M, <int>K, &Wb[0, 0, 0], <int>N, &b[0], &wabs[0], babs, tol,
                       <cnp.int64_t*>cnp.PyArray_DATA(out), nz, vals)
    free(nz)
    free(vals)
    return out


cpdef bint sparse_dense(const float[:, ::1] X, const float[:, ::1] W, const float[::1] b, float[:, ::1] Y,
                        double max_share=1.0):
    """Y := X.W + b summed over X's nonzeros only, if at most ``max_share`` of X is nonzero (each row in order of t:
    one sum per column in the first N // 128 * 128 columns, four up to N // 16 * 16, then one; the same sums in
    every instruction set); returns whether it did (else Y is untouched: use ``dense``). W best 64-byte
    aligned with rows of a multiple of 16 floats; without vector code (SPARSE_VECTORIZED) always False."""
    cdef Py_ssize_t M = X.shape[0], K = X.shape[1], N = W.shape[1]
    cdef int* nz
    cdef float* vals
    cdef int done
    if W.shape[0] != K or b.shape[0] != N or Y.shape[0] != M or Y.shape[1] != N:
        raise ValueError("sparse_dense: shapes do not match")
    if M == 0 or N == 0:
        return True
    if _level == 0:  # no sparse kernel built or chosen (SPARSE_VECTORIZED is False)
        return False
    nz = <int*>malloc((K + 16) * sizeof(int))
    vals = <float*>malloc((K + 16) * sizeof(float))
    if nz == NULL or vals == NULL:
        free(nz)
        free(vals)
        raise MemoryError()
    with nogil:
        done = _sparse_dense(&X[0, 0], <int>M, <int>K, &W[0, 0], <int>N, &b[0], &Y[0, 0], max_share * M * K,
                             nz, vals)
    free(nz)
    free(vals)
    return done != 0


# --------------------------------------------------------------------------------------------------------------
# The trunk: convolutions and max-pools over images, in oneDNN's summation order (the kernel is in _trunk.h)
# --------------------------------------------------------------------------------------------------------------
#: the trunk kernel's vector instruction sets (those with FMA); elsewhere :func:`trunk_forward` declines
TRUNK_VECTORIZED = ISA != "base"
#: widest convolution kernel the trunk kernel takes (its planes' padding)
TRUNK_MAX_KW = BP_TR_PAD - 64


def trunk_forward(const float[:, :, :, ::1] X, const int[:, ::1] spec, kernels, biases, float[:, :, :, ::1] Y):
    """Y := the chain of layers ``spec`` over the images X (N, H, W, C), channels-last; returns whether it did
    (False without an FMA instance, see TRUNK_VECTORIZED: Y is then untouched).

    spec rows: ``(0, KH, KW, IC, OC, relu, 0, 0)`` a valid stride-1 convolution with ``kernels[l]`` (KH, KW, IC, OC)
    and ``biases[l]`` (OC,), then ReLU (``max(y, 0)``) when ``relu``; ``(1, ph, pw, sh, sw, 0, 0, 0)`` a valid
    max-pool. Each convolution output is acc + b with acc = 0, then acc = fma(x, K, acc) over ky, kx, ci in that
    order (oneDNN's order on x86-64; denormals flushed, as TensorFlow runs), so the results can equal TensorFlow's to
    the bit (a caller must check that they do on its CPU)."""
    cdef Py_ssize_t N = X.shape[0], nl = spec.shape[0], l
    cdef int h = <int>X.shape[1], w = <int>X.shape[2], c = <int>X.shape[3], rs
    cdef size_t ps, bufn
    cdef const float** Ks
    cdef const float** Bs
    cdef const float[:, :, :, ::1] k
    cdef const float[::1] b
    cdef float[::1] buf
    cdef int ok
    if spec.shape[1] != 8 or len(kernels) != nl or len(biases) != nl:
        raise ValueError("trunk_forward: spec must be (layers, 8), with a kernel and a bias per layer")
    ks, bs = [], []
    rs, ps = w, <size_t>h * w + BP_TR_PAD
    bufn = c * ps
    for l in range(nl):
        if spec[l, 0] == 0:
            k, b = kernels[l], biases[l]
            if (k.shape[0] != spec[l, 1] or k.shape[1] != spec[l, 2] or k.shape[2] != c or k.shape[3] != spec[l, 4]
                    or spec[l, 3] != c or b.shape[0] != spec[l, 4] or spec[l, 4] < 1):
                raise ValueError(f"trunk_forward: layer {l}'s kernel or bias does not fit")
            if not 1 <= spec[l, 1] <= h or not 1 <= spec[l, 2] <= min(w, TRUNK_MAX_KW):
                raise ValueError(f"trunk_forward: layer {l}'s kernel is larger than its input (or than "
                                 f"{TRUNK_MAX_KW} columns)")
            h, w, c = h - spec[l, 1] + 1, w - spec[l, 2] + 1, spec[l, 4]
            ps = <size_t>h * rs + BP_TR_PAD
            ks.append(k)
            bs.append(b)
        elif spec[l, 0] == 1:
            if min(spec[l, 1], spec[l, 2], spec[l, 3], spec[l, 4]) < 1 or spec[l, 1] > h or spec[l, 2] > w:
                raise ValueError(f"trunk_forward: layer {l}'s pool does not fit")
            h, w = (h - spec[l, 1]) // spec[l, 3] + 1, (w - spec[l, 2]) // spec[l, 4] + 1
            rs, ps = w, <size_t>h * w + BP_TR_PAD
            ks.append(None)
            bs.append(None)
        else:
            raise ValueError(f"trunk_forward: layer {l} is neither a convolution (0) nor a pool (1)")
        bufn = max(bufn, c * ps)
    if Y.shape[0] != N or Y.shape[1] != h or Y.shape[2] != w or Y.shape[3] != c:
        raise ValueError(f"trunk_forward: Y must be {(N, h, w, c)}")
    if not TRUNK_VECTORIZED:
        return False
    if N == 0:
        return True
    buf = np.zeros(2 * bufn, np.float32)
    Ks = <const float**>malloc(max(nl, 1) * sizeof(float*))
    Bs = <const float**>malloc(max(nl, 1) * sizeof(float*))
    if Ks == NULL or Bs == NULL:
        free(Ks)
        free(Bs)
        raise MemoryError()
    for l in range(nl):
        Ks[l] = Bs[l] = NULL
        if ks[l] is not None:
            k, b = ks[l], bs[l]
            Ks[l] = &k[0, 0, 0, 0]
            Bs[l] = &b[0]
    with nogil:
        ok = _trunk_run(&X[0, 0, 0, 0], <int>N, <int>X.shape[1], <int>X.shape[2], <int>X.shape[3], <int>nl,
                        &spec[0, 0], Ks, Bs, &Y[0, 0, 0, 0], &buf[0], bufn)
    free(Ks)
    free(Bs)
    return ok != 0

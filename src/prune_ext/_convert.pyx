# cython: language_level=3
"""Pixel conversion for the trunk pass: stored images (float32 or float64, channels-first or channels-last) to
float32 channels-last times a scale, with the finiteness check, in one pass and without the GIL.

The arithmetic is numpy's ``np.float32(x) * np.float32(scale)``: each value is rounded to float32 first (to
nearest; values beyond float32 become infinite), then multiplied by the scale unless it is 1.
"""

ctypedef fused pixel_t:
    float
    double


cdef inline void _copy(const pixel_t* s, float* d, Py_ssize_t m, Py_ssize_t c, Py_ssize_t plane, bint nchw) \
        noexcept nogil:
    """One image: d = float32(s) in (H, W, C) order."""
    cdef Py_ssize_t y, k
    if not nchw:
        for y in range(m):
            d[y] = <float>s[y]
    elif c == 3:
        for y in range(plane):
            d[3 * y] = <float>s[y]
            d[3 * y + 1] = <float>s[plane + y]
            d[3 * y + 2] = <float>s[2 * plane + y]
    else:
        for k in range(c):
            for y in range(plane):
                d[y * c + k] = <float>s[k * plane + y]


cdef Py_ssize_t _convert(const pixel_t[:, :, :, ::1] src, float[:, :, :, ::1] dst, float scale,
                         bint nchw) noexcept nogil:
    """dst[i] = float32(src[i]) * scale ((H, W, C) order); the first image holding a non-finite value, or -1."""
    cdef Py_ssize_t n = dst.shape[0], c = dst.shape[3]
    cdef Py_ssize_t plane = dst.shape[1] * dst.shape[2]
    cdef Py_ssize_t m = plane * c
    cdef Py_ssize_t i, j
    cdef float* d
    cdef unsigned int bad
    for i in range(n):
        d = &dst[i, 0, 0, 0]
        _copy(&src[i, 0, 0, 0], d, m, c, plane, nchw)
        if scale != 1.0:
            for j in range(m):
                d[j] = d[j] * scale
        # x - x is 0 for every finite x and NaN for NaN and +-inf (IEEE arithmetic: no -ffast-math here)
        bad = 0
        for j in range(m):
            bad |= (d[j] - d[j]) != 0
        if bad:
            return i
    return -1


def to_nhwc(src, dst, float scale=1.0, bint nchw=True) -> int:
    """Write ``src`` (float32 or float64, C-contiguous (n, C, H, W), or (n, H, W, C) with ``nchw=False``) into
    ``dst`` (float32, C-contiguous (n, H, W, C)) as ``float32(src) * float32(scale)``.

    Returns the index of the first image holding a NaN or infinite value after the conversion, or -1; the images
    after that one are not written.
    """
    cdef float[:, :, :, ::1] d = dst
    cdef const float[:, :, :, ::1] sf
    cdef const double[:, :, :, ::1] sd
    cdef Py_ssize_t r
    shape = tuple(src.shape)
    want = (shape[0], shape[2], shape[3], shape[1]) if nchw else shape
    if tuple(dst.shape) != want:
        raise ValueError(f"dst has shape {tuple(dst.shape)}, expected {want}")
    if src.dtype.char == "f":
        sf = src
        with nogil:
            r = _convert(sf, d, scale, nchw)
    elif src.dtype.char == "d":
        sd = src
        with nogil:
            r = _convert(sd, d, scale, nchw)
    else:
        raise TypeError(f"src must be float32 or float64, got {src.dtype}")
    return r

"""prune_ext: the C-accelerated kernels of badprune (Cython over numpy buffers and scipy's BLAS).

Low-level layer, like h5py's ``h5d``: plain functions on C-contiguous float32 arrays, no TensorFlow, no policy.
``badprune.head`` builds on it.
"""
from ._kernels import (  # noqa: F401
    ACTIVATIONS,
    activation,
    affine_channels,
    argmax_rows,
    channel_activity,
    channel_means,
    conv2d,
    conv_remove_channel,
    dense,
    dense_remove_channel,
    gemm,
    ISA,
    pool2d,
    SPARSE_BLOCK,
    SPARSE_VECTORIZED,
    sparse_argmax,
    sparse_dense,
    TRUNK_MAX_KW,
    TRUNK_VECTORIZED,
    trunk_forward,
)


def aligned(a, alignment: int = 64):
    """``a`` as a C-contiguous float32 array whose data starts on an ``alignment``-byte boundary: ``a`` itself when
    it already is one, else a copy (numpy gives 16: the vector kernels' 64-byte loads then cross cache lines)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float32)
    if a.flags.c_contiguous and a.ctypes.data % alignment == 0:
        return a
    buf = np.empty(a.size + alignment // 4, np.float32)
    start = (-buf.ctypes.data % alignment) // 4
    out = buf[start:start + a.size].reshape(a.shape)
    out[...] = a
    return out

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
    pool2d,
    SPARSE_BLOCK,
    SPARSE_VECTORIZED,
    sparse_argmax,
)

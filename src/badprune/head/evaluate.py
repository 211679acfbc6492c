"""Evaluating a compiled head over prune-layer activations: one prune_ext call per op kind (:data:`KERNELS`)."""
from __future__ import annotations

import numpy as np

import prune_ext

#: with ``sparse=True``, a Dense on a ReLU's output is summed over its nonzero inputs only when at most this share of
#: them is nonzero (the GEMM is faster above: crossover about 0.3 measured for 960 x 160 on this project's 2-core CPU)
SPARSE_DENSE_MAX_SHARE = 0.25


def _dense(o, x, M, src_owned):
    X = x[0].reshape(-1, o.params["W"].shape[0])
    y = np.empty((X.shape[0], o.params["W"].shape[1]), np.float32)
    prune_ext.dense(X, o.params["W"], o.params["b"], y)
    return y.reshape((M,) + o.shape)


def _sparse_dense(head, o, x, M):
    """The Dense op ``o`` summed over its input's nonzeros (:func:`prune_ext.sparse_dense`), else as ``_dense``."""
    W = head._sparse_w.get(o.out)
    if W is None:  # whole cache lines per load
        W = head._sparse_w[o.out] = prune_ext.aligned(o.params["W"])
    X = x[0].reshape(-1, W.shape[0])
    y = np.empty((X.shape[0], W.shape[1]), np.float32)
    if not prune_ext.sparse_dense(X, W, o.params["b"], y, SPARSE_DENSE_MAX_SHARE):
        prune_ext.dense(X, o.params["W"], o.params["b"], y)
    return y.reshape((M,) + o.shape)


def _conv(o, x, M, src_owned):
    y = np.empty((M,) + o.shape, np.float32)
    sh, sw, pt, pl, dh, dw = o.params["geom"]
    prune_ext.conv2d(x[0], o.params["K"], o.params["b"], sh, sw, pt, pl, dh, dw, y)
    return y


def _act(o, x, M, src_owned):
    y = x[0] if src_owned else x[0].copy()
    last = y.shape[-1] if o.params["kind"] == "softmax" else int(np.prod(y.shape[1:]))
    prune_ext.activation(y.reshape(-1, last), prune_ext.ACTIVATIONS[o.params["kind"]], *o.params["p"])
    return y


def _reshape(o, x, M, src_owned):
    return x[0].reshape((M,) + o.shape)


def _pool(o, x, M, src_owned):
    y = np.empty((M,) + o.shape, np.float32)
    ph, pw, sh, sw, pt, pl = o.params["geom"]
    prune_ext.pool2d(x[0], ph, pw, sh, sw, pt, pl, o.params["average"], y)
    return y


def _bn(o, x, M, src_owned):
    y = x[0].copy()
    prune_ext.affine_channels(y.reshape(-1, y.shape[-1]), o.params["scale"], o.params["shift"])
    return y


def _merge(o, x, M, src_owned):
    y = x[0]
    for z in x[1:]:
        y = o.params["fn"](y, z)
    return np.ascontiguousarray(y, dtype=np.float32)


def _average(o, x, M, src_owned):
    return (np.sum(x, axis=0) / np.float32(len(x))).astype(np.float32)


def _concat(o, x, M, src_owned):
    return np.ascontiguousarray(np.concatenate(x, axis=o.params["axis"]), dtype=np.float32)


def _gpool(o, x, M, src_owned):
    return (x[0].mean(axis=(1, 2)) if o.params["average"] else x[0].max(axis=(1, 2))).astype(np.float32)


#: op kind -> kernel(op, input arrays, batch size, first input may be overwritten) -> output array
KERNELS = {"dense": _dense, "conv": _conv, "act": _act, "reshape": _reshape, "pool": _pool, "bn": _bn,
           "merge": _merge, "average": _average, "concat": _concat, "gpool": _gpool}


def plan(head, given: frozenset, target=None) -> list:
    """The ops needed to reach ``target`` (default: the logits) when the tensors in ``given`` are supplied."""
    target = head.out_id if target is None else target
    key = (given, target)
    if key in head._plans:
        return head._plans[key]
    need = {target}
    steps = []
    for o in reversed(head.ops):
        if o.out in need and o.out not in given:
            steps.append(o)
            need.update(o.inputs)
    steps.reverse()
    head._plans[key] = steps
    return steps


def forward(head, F=None, given=None, keep=(), target=None, given_owned=False, sparse=False):
    """Logits (pre-softmax when the model ends in softmax) of ``head`` for a batch.

    Parameters
    ----------
    F : ndarray, optional
        float32 (M, H, W, C) prune-layer activations (already masked).
    given : dict, optional
        {tensor id: array} of tensors supplied instead of computed (e.g. updated pre-activations).
    keep : tuple
        Tensor ids to return too.
    target : int, optional
        The tensor to return instead of the logits.
    given_owned : bool
        The ``given`` arrays are scratch copies that may be overwritten (saves a copy before an activation).
    sparse : bool
        Sum the Dense ops on ReLU outputs (``head.relu_fed``) over their nonzero inputs when those are few
        (:data:`SPARSE_DENSE_MAX_SHARE`, on CPUs with ``prune_ext.SPARSE_VECTORIZED``): the same values up to the
        order of the float32 sums.

    Returns
    -------
    ndarray or (ndarray, dict)
        (M, K) logits, or (logits, {id: array}) when ``keep`` is given.
    """
    given = dict(given or {})
    if head.tf_head is not None:
        out = _tf_forward(head, F)
        return (out, {}) if keep else out
    if F is not None:
        given[0] = np.ascontiguousarray(F, dtype=np.float32)
    M = next(iter(given.values())).shape[0]
    target = head.out_id if target is None else target
    t = dict(given)
    owned = set(given) if given_owned else set()
    keep = set(keep)
    sparse = sparse and prune_ext.SPARSE_VECTORIZED
    for o in plan(head, frozenset(given), target):
        src = o.inputs[0] if o.inputs else None
        src_owned = src in owned and head.consumers.get(src, 0) == 1 and src not in keep
        if sparse and o.out in head.relu_fed:
            t[o.out] = _sparse_dense(head, o, [t[i] for i in o.inputs], M)
        else:
            t[o.out] = np.ascontiguousarray(KERNELS[o.kind](o, [t[i] for i in o.inputs], M, src_owned))
        if o.kind != "reshape":  # reshapes are views of their input: never modified in place
            owned.add(o.out)
    out = t[target].reshape(M, -1)
    if keep:
        return out, {i: t[i] for i in keep}
    return out


def _tf_forward(head, F):
    import tensorflow as tf

    if head._tf_fn is None:
        head._tf_fn = tf.function(lambda x: head.tf_head(x, training=False), reduce_retracing=True)
    outs = [head._tf_fn(tf.constant(F[i:i + 4096])).numpy() for i in range(0, len(F), 4096)]
    return np.concatenate(outs).reshape(len(F), -1) if outs else np.zeros((0,) + head.output_shape, np.float32)


def labels(head, F, mask=None, batch_size=4096):
    """Predicted labels (int64) for activations F (N, H, W, C), with channels where ``mask`` is 0 zeroed."""
    out = np.empty(len(F), np.int64)
    for lo in range(0, len(F), batch_size):
        x = np.array(F[lo:lo + batch_size], dtype=np.float32)
        if mask is not None:
            x[..., ~np.asarray(mask, bool)] = 0
        out[lo:lo + batch_size] = prune_ext.argmax_rows(np.ascontiguousarray(forward(head, x), np.float32))
    return out

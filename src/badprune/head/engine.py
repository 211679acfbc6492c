"""The pruning sweep's engine: the head's labels after masking each channel in turn, computed incrementally.

Each step masks one more channel, and :class:`MaskedSweep` uses that:

* a sample whose activations in that channel are all zero cannot change, so only the others are re-evaluated;
* linear consumers of the masked tensor (a Dense on its flattening, a Conv2D on it) keep their pre-activations
  for every sample and subtract the masked channel's contribution instead of recomputing;
* only the changed samples run the rest of the head;
* a final Dense layer (logits = h.W + b) on a mostly-zero input h (a ReLU's output) is summed over h's nonzeros
  only, block by block, with the argmax taken on the way and no logits kept (:func:`prune_ext.sparse_argmax`). Its
  label is used when its lead over the runner-up exceeds a float32 rounding bound, so that any evaluation order
  (BLAS's, TensorFlow's) gives the same label; otherwise the whole layer is computed for that sample.

The samples are independent, so they are cut into contiguous shards (one per core) swept side by side in threads;
the kernels release the GIL and BLAS runs single-threaded in each (``threadpoolctl``), which keeps both cores busy
in the non-GEMM kernels too.
"""
from __future__ import annotations

import threading

import numpy as np

import prune_ext

from .._env import cpu_count
from .compiler import final_dense
from .evaluate import plan

#: the final layer's sparse argmax is used on batches whose inputs are at most this share nonzero (else the GEMM)
SPARSE_MAX_SHARE = 0.5
#: the fewest samples per shard: smaller sets run in one thread
MIN_SHARD_ROWS = 2048
MODES = ("incremental", "full")


class MaskedSweep:
    """Iterating yields ``(k, channel, labels)`` for k = 0..len(order): the labels of all samples with
    ``order[:k]`` masked (``channel`` is -1 at k = 0).

    ``labels`` may be the same array each time (updated in place); copy it to keep a step. ``mode='full'``
    re-evaluates every sample's whole head at each step (the reference, without the shortcuts).

    ``jobs``: the samples are cut into this many contiguous shards (default: one per core, at least
    :data:`MIN_SHARD_ROWS` samples each), swept side by side in threads with single-threaded BLAS; a sample's labels
    do not depend on the shard it is in; each shard runs ahead at its own pace, and step k is yielded once all
    have done it. A head that runs in TensorFlow is swept in one thread.

    Attributes, updated as the sweep runs (with shards, they may already count later steps of a shard that ran
    ahead; the totals at the end are exact): ``rows`` (samples re-evaluated over all steps), ``exact_final`` (rows
    whose final layer was computed in full), ``screened`` (rows the final layer's sparse argmax was tried on) and
    ``nonzeros`` (their nonzero final-layer inputs, summed).
    """

    def __init__(self, head, F: np.ndarray, order, mode: str = "incremental", batch_size: int = 1024,
                 jobs: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be 'incremental' or 'full', not {mode!r}")
        self.head = head
        self.F = np.ascontiguousarray(F, dtype=np.float32)
        self.order = [int(c) for c in order]
        self.mode = mode
        self.batch_size = int(batch_size)
        self.jobs = cpu_count() if jobs is None else int(jobs)
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, not {jobs!r}")
        self.rows = self.exact_final = self.screened = self.nonzeros = 0

    @property
    def stats(self) -> dict:
        """``{'rows', 'exact_final', 'screened', 'nonzeros'}`` so far."""
        return {"rows": self.rows, "exact_final": self.exact_final, "screened": self.screened,
                "nonzeros": self.nonzeros}

    def __iter__(self):
        N = len(self.F)
        jobs = max(1, min(self.jobs, N // MIN_SHARD_ROWS)) if self.head.tf_head is None else 1
        labels = np.empty(N, np.int64)
        self.rows = self.exact_final = self.screened = self.nonzeros = 0
        active = None
        if self.mode == "incremental":
            H, W, C = self.head.input_shape
            active = prune_ext.channel_activity(self.F.reshape(N, H * W, C))
        cuts = _cuts(active, N, jobs)
        shards = [_Stats() for _ in range(jobs)]
        steps = [self._shard(self.F[a:b], labels[a:b], st, None if active is None else active[a:b])
                 for (a, b), st in zip(zip(cuts[:-1], cuts[1:]), shards)]
        if jobs == 1:
            for k, c in steps[0]:
                self._total(shards)
                yield k, c, labels
            return
        # one thread per shard, each running ahead at its own pace (BLAS single-threaded: the threads fill the
        # cores); step k is yielded once every shard has done it
        from threadpoolctl import threadpool_limits

        store = np.empty((len(self.order) + 1, N), np.int32 if self.head.output_shape[-1] < 2 ** 31 else np.int64)
        done, channels, errors = [0] * jobs, [-1] * (len(self.order) + 1), []
        cond, stop = threading.Condition(), threading.Event()

        def work(i, a, b):
            try:
                for k, c in steps[i]:
                    store[k, a:b] = labels[a:b]
                    with cond:
                        done[i], channels[k] = k + 1, c
                        cond.notify_all()
                    if stop.is_set():
                        return
            except BaseException as e:  # handed to the consumer's thread
                with cond:
                    errors.append(e)
                    cond.notify_all()

        threads = [threading.Thread(target=work, args=(i, int(a), int(b)), name=f"badprune-sweep-{i}", daemon=True)
                   for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        # BLAS stays single-threaded (process-wide) until every shard has stopped, the consumer's code between the
        # steps included
        with threadpool_limits(1, user_api="blas"):
            try:
                for t in threads:
                    t.start()
                for k in range(len(self.order) + 1):
                    with cond:
                        while min(done) <= k and not errors:
                            cond.wait(0.5)
                        if errors:
                            raise errors[0]
                    self._total(shards)
                    yield k, channels[k], store[k]
            finally:
                stop.set()  # a shard still running stops after its current step
                for t in threads:
                    if t.is_alive():
                        t.join()
                for g in steps:
                    g.close()

    def _total(self, shards) -> None:
        self.rows = sum(s.rows for s in shards)
        self.exact_final = sum(s.exact_final for s in shards)
        self.screened = sum(s.screened for s in shards)
        self.nonzeros = sum(s.nonzeros for s in shards)

    def _shard(self, F, labels, stats, active):
        """Yield ``(k, channel)`` for k = 0..len(order) with ``labels`` (this shard's samples ``F``; ``active``:
        their :func:`prune_ext.channel_activity`, None in full mode) updated."""
        head, bs = self.head, self.batch_size
        incremental = self.mode == "incremental"
        native = head.tf_head is None
        N = len(F)
        H, W, C = head.input_shape
        F3 = F.reshape(N, H * W, C)
        mask = np.ones(C, bool)

        linear = head.linear if (incremental and native) else {}
        final = final_dense(head) if (incremental and native) else None  # the logits' Dense (then reshapes)
        if final is not None and len(head.shapes[final.inputs[0]]) != 1:
            final = None
        keep = tuple(head.ops[i].out for i in linear)
        state = {head.ops[i].out: np.empty((N,) + head.shapes[head.ops[i].out], np.float32) for i in linear}
        sparse = _SparseFinal(final) if final is not None else None

        # step 0: every sample's whole head, keeping the linear states (the final layer's statistics count the
        # later steps only)
        target = None if final is None or final.out in keep else final.inputs[0]
        for lo in range(0, N, bs):
            x = F[lo:lo + bs]
            hi = lo + len(x)
            if keep:
                out, kept = head.forward(x, keep=keep, target=target, sparse=incremental)
                for tid in state:
                    state[tid][lo:hi] = kept[tid]
            else:
                out = head.forward(x, target=target, sparse=incremental)
            out = np.ascontiguousarray(out, np.float32)
            labels[lo:hi] = prune_ext.argmax_rows(out) if target is None else sparse.labels(out, _Stats())
        yield 0, -1

        left = active.sum(axis=1, dtype=np.int64) if incremental else None  # unmasked active channels per sample
        needs_F = not native or any(0 in o.inputs for o in plan(head, frozenset(state),
                                                                None if final is None else final.inputs[0]))
        for k, c in enumerate(self.order, 1):
            mask[c] = False
            rows = np.flatnonzero(active[:, c]).astype(np.int64) if incremental else np.arange(N, dtype=np.int64)
            if linear:
                left[rows] -= 1
            stats.rows += len(rows)
            for lo in range(0, len(rows), bs):
                r = rows[lo:lo + bs]
                given = {}  # the updated pre-activations of these rows, fresh copies (the forward may overwrite them)
                gone = np.flatnonzero(left[r] == 0) if linear else ()  # no unmasked active channel: a zero input
                for i, kind in linear.items():
                    o = head.ops[i]
                    z = state[o.out]
                    given[o.out] = g = np.empty((len(r),) + z.shape[1:], np.float32)
                    if kind == "dense":
                        prune_ext.dense_remove_channel(z.reshape(N, -1), F3, r, o.params["W"], c,
                                                       g.reshape(len(r), -1))
                    else:
                        sh, sw, pt, pl, dh, dw = o.params["geom"]
                        prune_ext.conv_remove_channel(z, F, r, o.params["K"], c, sh, sw, pt, pl, dh, dw, g)
                    if len(gone):
                        # reset to the exact pre-activation of a zero input (the bias), dropping the subtractions'
                        # rounding, so that samples whose input is gone tie exactly as in TensorFlow
                        z[r[gone]] = g[gone] = o.params["b"]
                x = None
                if needs_F:
                    x = F[r]
                    x[..., ~mask] = 0
                if final is None:
                    logits = head.forward(x, given=given, given_owned=True, sparse=incremental)
                    labels[r] = prune_ext.argmax_rows(np.ascontiguousarray(logits, np.float32))
                    continue
                h = np.ascontiguousarray(head.forward(x, given=given, target=final.inputs[0], given_owned=True,
                                                      sparse=True), np.float32)
                labels[r] = sparse.labels(h, stats)
            yield k, c


class _SparseFinal:
    """The final Dense layer's labels for re-evaluated samples (see the module docstring): W in the column blocks
    :func:`prune_ext.sparse_argmax` reads, padded to whole blocks with classes whose bias is -inf."""

    def __init__(self, final):
        self.W, self.b = final.params["W"], final.params["b"]
        K, n = self.W.shape
        self.n_out = n
        B = prune_ext.SPARSE_BLOCK
        N = -(-n // B) * B
        Wp = np.zeros((K, N), np.float32)
        Wp[:, :n] = self.W
        self.Wb = prune_ext.aligned(Wp.reshape(K, N // B, B).transpose(1, 0, 2))  # whole cache lines per load
        bp = np.full(N, -np.inf, np.float32)
        bp[:n] = self.b
        self.bp = prune_ext.aligned(bp)
        self.wabs = np.abs(self.W).max(axis=1).astype(np.float32) if n else np.zeros(K, np.float32)
        self.babs = float(np.abs(self.b).max()) if n else 0.0
        m, u = K + 2, 2.0 ** -24
        #: 4 * gamma_(K+2) makes the label order-independent (prune_ext.sparse_argmax); 5 leaves room for the
        #: rounding of the bound itself
        self.tol = 5 * m * u / (1 - m * u)
        self.on = (prune_ext.SPARSE_VECTORIZED and n > 1 and K > 0 and bool(np.isfinite(self.W).all())
                   and bool(np.isfinite(self.b).all()))

    def labels(self, h, stats) -> np.ndarray:
        """argmax of h.W + b per row (first maximum), as ``dense`` + ``argmax_rows`` give it."""
        nz = np.count_nonzero(h) if self.on else 0
        if self.on and nz <= SPARSE_MAX_SHARE * h.size:
            lab = prune_ext.sparse_argmax(h, self.Wb, self.bp, self.wabs, self.babs, self.tol)
            stats.screened += len(h)
            stats.nonzeros += int(nz)
            redo = np.flatnonzero(lab < 0)
            if len(redo):
                lab[redo] = self._exact(np.ascontiguousarray(h[redo]))
                stats.exact_final += len(redo)
            return lab
        stats.exact_final += len(h)
        return self._exact(h)

    def _exact(self, h) -> np.ndarray:
        logits = np.empty((len(h), self.n_out), np.float32)
        prune_ext.dense(h, self.W, self.b, logits)
        return prune_ext.argmax_rows(logits)


class _Stats:
    """One shard's counters (see :class:`MaskedSweep`'s attributes)."""

    def __init__(self):
        self.rows = self.exact_final = self.screened = self.nonzeros = 0


def _cuts(active, N: int, jobs: int) -> np.ndarray:
    """Shard bounds [0, ..., N]: equal numbers of (sample, channel) pairs the sweep re-evaluates (its work), else
    equal numbers of samples."""
    if jobs == 1 or active is None:
        return np.linspace(0, N, jobs + 1).astype(np.int64)
    work = np.cumsum(active.sum(axis=1, dtype=np.int64))
    cuts = np.searchsorted(work, np.linspace(0, work[-1], jobs + 1)[1:-1]).astype(np.int64)
    return np.concatenate([[0], np.maximum.accumulate(cuts), [N]])


def masked_steps(head, F, order, mode: str = "incremental", batch_size: int = 1024):
    """Iterate a :class:`MaskedSweep` of ``head`` over ``F`` in ``order`` (for callers that need no statistics)."""
    return iter(MaskedSweep(head, F, order, mode, batch_size))

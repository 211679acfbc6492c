"""The pruning sweep's engine: the head's labels after masking each channel in turn, computed incrementally.

Each step masks one more channel, and :class:`MaskedSweep` uses that:

* a sample whose activations in that channel are all zero cannot change, so only the others are re-evaluated;
* linear consumers of the masked tensor (a Dense on its flattening, a Conv2D on it) keep their pre-activations
  for every sample and subtract the masked channel's contribution instead of recomputing;
* only the changed samples run the rest of the head;
* a final Dense layer (logits = h.W + b) is screened: when a sample's logits are computed exactly, its input
  h_ref, its top-K classes and the (K+1)-th logit (the floor) are kept. Later only the K candidates' logits are
  computed; a class outside them had a logit <= floor at h_ref and can have gained at most
  (h - h_ref).mu + ||h - h_ref|| * max_j ||W_j - mu|| (mu: the mean class vector), so when the best candidate
  beats that (plus a rounding margin) it is the argmax. Otherwise the whole layer is recomputed for that sample.

The samples are independent, so they are cut into contiguous shards (one per core) swept side by side in threads;
the kernels release the GIL and BLAS runs single-threaded in each (``threadpoolctl``), which keeps both cores busy
in the non-GEMM kernels too.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import prune_ext

from .evaluate import plan

#: the final-layer screen stays on while it answers for at least this share of the samples it tries ...
SCREEN_MIN_SHARE = 0.2
#: ... and is tried again this many steps after it was switched off
SCREEN_RETRY = 8
#: candidates kept per sample for the final-layer screen
SCREEN_K = 16
#: the fewest samples per shard: smaller sets run in one thread
MIN_SHARD_ROWS = 2048
MODES = ("incremental", "full")


class MaskedSweep:
    """Iterating yields ``(k, channel, labels)`` for k = 0..len(order): the labels of all samples with
    ``order[:k]`` masked (``channel`` is -1 at k = 0).

    ``labels`` is the same array each time (updated in place); copy it to keep a step. ``mode='full'``
    re-evaluates every sample's whole head at each step (the reference, without the shortcuts).

    ``screen_min_share`` / ``screen_retry``: the final-layer screen's policy (default :data:`SCREEN_MIN_SHARE`,
    :data:`SCREEN_RETRY`).

    ``jobs``: the samples are cut into this many contiguous shards (default: one per core, at least
    :data:`MIN_SHARD_ROWS` samples each), swept side by side in threads with single-threaded BLAS; a sample's labels
    do not depend on the shard it is in. A head that runs in TensorFlow is swept in one thread.

    Attributes, updated as the sweep runs: ``rows`` (samples re-evaluated over all steps), ``exact_final`` (rows
    whose final layer was computed in full), ``screened`` (rows the final-layer screen was tried on).
    """

    def __init__(self, head, F: np.ndarray, order, mode: str = "incremental", batch_size: int = 1024,
                 screen_min_share: float | None = None, screen_retry: int | None = None, jobs: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be 'incremental' or 'full', not {mode!r}")
        self.head = head
        self.F = np.ascontiguousarray(F, dtype=np.float32)
        self.order = [int(c) for c in order]
        self.mode = mode
        self.batch_size = int(batch_size)
        self.screen_min_share = SCREEN_MIN_SHARE if screen_min_share is None else float(screen_min_share)
        self.screen_retry = SCREEN_RETRY if screen_retry is None else int(screen_retry)
        self.jobs = _cores() if jobs is None else int(jobs)
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, not {jobs!r}")
        self.rows = self.exact_final = self.screened = 0

    @property
    def stats(self) -> dict:
        """``{'rows', 'exact_final', 'screened'}`` so far."""
        return {"rows": self.rows, "exact_final": self.exact_final, "screened": self.screened}

    def __iter__(self):
        N = len(self.F)
        jobs = max(1, min(self.jobs, N // MIN_SHARD_ROWS)) if self.head.tf_head is None else 1
        labels = np.empty(N, np.int64)
        self.rows = self.exact_final = self.screened = 0
        cuts = np.linspace(0, N, jobs + 1).astype(np.int64)
        shards = [_Stats() for _ in range(jobs)]
        steps = [self._shard(self.F[a:b], labels[a:b], st) for (a, b), st in zip(zip(cuts[:-1], cuts[1:]), shards)]
        if jobs == 1:
            for k, c in steps[0]:
                self._total(shards)
                yield k, c, labels
            return
        # one thread per shard of the samples; each shard's BLAS calls single-threaded (the threads fill the cores)
        from threadpoolctl import threadpool_limits

        pool = ThreadPoolExecutor(jobs, thread_name_prefix="badprune-sweep")
        try:
            with threadpool_limits(1, user_api="blas"):
                while True:
                    done = [f.result() for f in [pool.submit(_advance, g) for g in steps]]
                    if done[0] is None:
                        return
                    self._total(shards)
                    yield done[0][0], done[0][1], labels
        finally:
            pool.shutdown(wait=True)  # a shard may still be running when another failed or the consumer stopped
            for g in steps:
                g.close()

    def _total(self, shards) -> None:
        self.rows = sum(s.rows for s in shards)
        self.exact_final = sum(s.exact_final for s in shards)
        self.screened = sum(s.screened for s in shards)

    def _shard(self, F, labels, stats):
        """Yield ``(k, channel)`` for k = 0..len(order) with ``labels`` (this shard's samples ``F``) updated."""
        head, bs = self.head, self.batch_size
        incremental = self.mode == "incremental"
        native = head.tf_head is None
        N = len(F)
        H, W, C = head.input_shape
        F3 = F.reshape(N, H * W, C)
        mask = np.ones(C, bool)

        linear = head.linear if (incremental and native) else {}
        final = None
        last = head.ops[-1] if native else None
        if incremental and native and last.kind == "dense" and len(head.shapes[last.inputs[0]]) == 1:
            final = last
        keep = tuple(head.ops[i].out for i in linear) + ((final.inputs[0],) if final is not None else ())
        state = {head.ops[i].out: np.empty((N,) + head.shapes[head.ops[i].out], np.float32) for i in linear}
        screen = _FinalScreen(final, N, head.shapes) if final is not None else None

        # step 0: every sample's whole head, keeping the linear states and the screen's references
        for lo in range(0, N, bs):
            x = F[lo:lo + bs]
            hi = lo + len(x)
            if keep:
                logits, kept = head.forward(x, keep=keep)
                for tid in state:
                    state[tid][lo:hi] = kept[tid]
            else:
                logits = head.forward(x)
            logits = np.ascontiguousarray(logits, np.float32)
            labels[lo:hi] = prune_ext.argmax_rows(logits)
            if screen is not None:
                screen.reference(lo, hi, kept[final.inputs[0]], logits)
        yield 0, -1

        active = prune_ext.channel_activity(F3) if incremental else None
        left = active.sum(axis=1, dtype=np.int64) if incremental else None  # unmasked active channels per sample
        needs_F = not native or any(0 in o.inputs for o in plan(head, frozenset(state),
                                                                None if final is None else final.inputs[0]))
        screen_ok, last_try = True, 0
        for k, c in enumerate(self.order, 1):
            mask[c] = False
            rows = np.flatnonzero(active[:, c]).astype(np.int64) if incremental else np.arange(N, dtype=np.int64)
            if linear:
                left[rows] -= 1
                empty = rows[left[rows] == 0]  # no unmasked active channel left: the input is exactly zero
            for i, kind in linear.items():
                o = head.ops[i]
                if kind == "dense":
                    prune_ext.dense_remove_channel(state[o.out].reshape(N, -1), F3, rows, o.params["W"], c)
                else:
                    sh, sw, pt, pl, dh, dw = o.params["geom"]
                    prune_ext.conv_remove_channel(state[o.out], F, rows, o.params["K"], c, sh, sw, pt, pl, dh, dw)
                # reset to the exact pre-activation of a zero input (the bias), dropping the subtractions'
                # rounding, so that samples whose input is gone tie exactly as in TensorFlow
                state[o.out][empty] = o.params["b"]
            stats.rows += len(rows)
            screening = screen is not None and screen.K > 0 and (screen_ok or k - last_try >= self.screen_retry)
            if screening:
                last_try = k
            tried = answered = 0
            for lo in range(0, len(rows), bs):
                r = rows[lo:lo + bs]
                given = {tid: state[tid][r] for tid in state}  # fresh copies: the forward may overwrite them
                x = None
                if needs_F:
                    x = F[r]
                    x[..., ~mask] = 0
                if final is None:
                    logits = head.forward(x, given=given, given_owned=True)
                    labels[r] = prune_ext.argmax_rows(np.ascontiguousarray(logits, np.float32))
                    continue
                h = np.ascontiguousarray(head.forward(x, given=given, target=final.inputs[0], given_owned=True),
                                         np.float32)
                if screening:
                    lab = screen.screen(h, r)
                    redo = lab < 0
                    labels[r[~redo]] = lab[~redo]
                    tried += len(r)
                    answered += len(r) - int(redo.sum())
                    hr, rr = np.ascontiguousarray(h[redo]), r[redo]
                else:
                    hr, rr = h, r
                if len(rr):
                    labels[rr] = screen.exact(hr, rr, refresh=screening)
                    stats.exact_final += len(rr)
            if screening and tried:
                screen_ok = answered >= self.screen_min_share * tried
                stats.screened += tried
            yield k, c


class _Stats:
    """One shard's counters (see :class:`MaskedSweep`'s attributes)."""

    def __init__(self):
        self.rows = self.exact_final = self.screened = 0


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _advance(steps):
    return next(steps, None)


class _FinalScreen:
    """The final Dense layer's references per sample and its provable top-K screen (see the module docstring)."""

    def __init__(self, final, N, shapes):
        self.W, self.b = final.params["W"], final.params["b"]
        self.n_out = self.W.shape[1]
        self.K = K = min(SCREEN_K, self.n_out - 1)
        self.h_ref = np.empty((N,) + shapes[final.inputs[0]], np.float32)
        self.cand = np.empty((N, K), np.int64)
        self.floor = np.empty(N, np.float32)
        self.Wt = np.ascontiguousarray(self.W.T)
        Wd = self.W.astype(np.float64)
        self.mu = np.ascontiguousarray(Wd.mean(axis=1))
        self.rmax = float(np.sqrt(((Wd - self.mu[:, None]) ** 2).sum(axis=0)).max()) * (1 + 1e-6)
        self.top_logit = 0.0

    @property
    def tol(self) -> float:
        """float32 rounding of the stored logits, with a wide safety factor."""
        return 1e-4 * max(1.0, self.top_logit)

    def reference(self, lo, hi, h, logits):
        """Keep samples [lo, hi)'s final-layer input and top-K of their exact ``logits`` (step 0)."""
        self.h_ref[lo:hi] = h
        if self.K > 0:
            prune_ext.topk_refs(logits, self.cand[lo:hi], self.floor[lo:hi])
        self.top_logit = max(self.top_logit, float(np.abs(logits).max(initial=0.0)))

    def screen(self, h, rows):
        """Labels of ``rows`` (inputs ``h``) the screen can prove, -1 where the layer must be computed."""
        return prune_ext.screen_final(h, self.h_ref, rows, self.cand, self.floor, self.Wt, self.b, self.mu,
                                      self.rmax, self.tol)

    def exact(self, h, rows, refresh: bool):
        """Labels of ``rows`` from the whole layer; with ``refresh`` their references are renewed (the top
        candidate is the argmax, ties to the lower class)."""
        logits = np.empty((len(h), self.n_out), np.float32)
        prune_ext.dense(h, self.W, self.b, logits)
        if not refresh:
            return prune_ext.argmax_rows(logits)
        sub_cand = np.empty((len(rows), self.K), np.int64)
        sub_floor = np.empty(len(rows), np.float32)
        prune_ext.topk_refs(logits, sub_cand, sub_floor)
        self.cand[rows], self.floor[rows], self.h_ref[rows] = sub_cand, sub_floor, h
        return sub_cand[:, 0]


def masked_steps(head, F, order, mode: str = "incremental", batch_size: int = 1024):
    """Iterate a :class:`MaskedSweep` of ``head`` over ``F`` in ``order`` (for callers that need no statistics)."""
    return iter(MaskedSweep(head, F, order, mode, batch_size))

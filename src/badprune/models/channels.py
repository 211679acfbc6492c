"""Pruned channels as plain arrays (TensorFlow-free): the channel check, the 0/1 mask and its layer's weights, and
:class:`Patch`, what turns a template model into the variant that has a given set of channels pruned."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadpruneError

#: :attr:`Patch.rule` values
RULES = ("zero", "mask")


def check_channels(channels, n: int, layer: str) -> list:
    """``channels`` as a sorted list of distinct ints, each checked to be a channel of ``layer`` (``n`` of them)."""
    chans = [int(c) for c in np.asarray(list(channels), dtype=np.int64).reshape(-1)]
    bad = [c for c in chans if not 0 <= c < n]
    if bad:
        raise BadpruneError(f"channel {bad[0]} is out of range for layer '{layer}' ({n} channels)")
    return sorted(set(chans))


def channel_mask(n: int, pruned) -> np.ndarray:
    """float32 (n,): 0 at the ``pruned`` channels, 1 elsewhere."""
    mask = np.ones(n, np.float32)
    mask[list(pruned)] = 0
    return mask


def mask_weights(n: int, pruned) -> list:
    """A channel-mask layer's weights: ``[the (1, 1, n, 1) kernel of the 0/1`` :func:`channel_mask` ``]``."""
    return [channel_mask(n, pruned).reshape(1, 1, n, 1)]


def zeroed(weights, chans) -> list:
    """A convolution's weights (``[kernel]`` or ``[kernel, bias]``) with output channels ``chans`` zeroed
    (kernel[..., c] and bias[c]), as new arrays."""
    ws = [np.array(w) for w in weights]
    ws[0][..., list(chans)] = 0
    if len(ws) > 1:
        ws[1][list(chans)] = 0
    return ws


@dataclass
class Patch:
    """What differs between the variants of one template model: the weights of its layer ``layer`` for a set of
    pruned channels (of ``n``). ``rule`` 'zero': the producing convolution's weights ``base`` with the channels
    zeroed (B'); 'mask': the 0/1 channel mask's kernel (B' without a producing convolution, and G)."""

    layer: str
    rule: str
    n: int
    base: list | None = None

    def weights(self, channels) -> dict:
        """{layer: arrays} for the variant with ``channels`` (checked by the caller, :func:`check_channels`) pruned,
        for :func:`badprune.models.save_variants`."""
        if self.rule == "zero":
            return {self.layer: zeroed(self.base, channels)}
        return {self.layer: mask_weights(self.n, channels)}

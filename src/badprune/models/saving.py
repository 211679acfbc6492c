"""Saving several ``.keras`` files that differ from one model only in a few layers' weights and the model's name
(B'_X for each X, G_X for each X), serializing and tracing nothing per file.

A ``.keras`` file is a stored (uncompressed) zip of ``metadata.json``, ``config.json`` and ``model.weights.h5``,
where each layer's weights are the datasets ``0, 1, ...`` of an HDF5 group ``.../vars`` whose ``name`` attribute is
the layer's name, and the top-level ``vars`` group's ``name`` is the model's. :func:`save_variants` has Keras write
the model once (:func:`template`), then writes each file as that archive with the given layers' datasets
overwritten (same shapes and dtypes) and the name replaced in ``config.json`` and in the weights file
(:func:`write_variants`, which needs only h5py: a warm sweep writes its models from templates kept in the cache).
When the archive Keras wrote is not laid out like that (another Keras version), each file is written by Keras
instead, the weights set on the model for the save and restored after it. Either way every file opens with plain
``keras.models.load_model``.

Nothing here imports Keras: the one Keras call is the model's own ``save``.
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import h5py
import numpy as np

_META, _CONFIG, _WEIGHTS = "metadata.json", "config.json", "model.weights.h5"


class _Layout(Exception):
    """The archive Keras wrote is not laid out as this module expects."""


def _var_groups(f: h5py.File) -> dict:
    """layer name -> its ``vars`` group, for every layer group in a Keras 3 weights file (a name seen twice is
    dropped: it cannot be told apart)."""
    found, twice = {}, set()

    def visit(path, obj):
        if isinstance(obj, h5py.Group) and path.endswith("/vars"):  # not the model's own top-level "vars"
            name = obj.attrs.get("name")
            name = name.decode() if isinstance(name, bytes) else name
            if isinstance(name, str):
                if name in found:
                    twice.add(name)
                found[name] = obj

    f.visititems(visit)
    return {n: g for n, g in found.items() if n not in twice}


def _patched_weights(h5: bytes, weights: dict, name: str | None) -> bytes:
    bio = io.BytesIO(h5)
    with h5py.File(bio, "r+") as f:
        groups = _var_groups(f)
        for layer, arrays in weights.items():
            g = groups.get(layer)
            if g is None or sorted(g.keys()) != [str(i) for i in range(len(arrays))]:
                raise _Layout(f"no weights group for layer {layer!r}")
            for i, a in enumerate(arrays):
                ds, a = g[str(i)], np.asarray(a)
                if ds.shape != a.shape or ds.dtype != a.dtype:
                    raise _Layout(f"layer {layer!r} weight {i}: {ds.shape} {ds.dtype} != {a.shape} {a.dtype}")
                ds[...] = a
        if name is not None:
            if "vars" not in f:
                raise _Layout("no top-level vars group")
            f["vars"].attrs["name"] = name
    return bio.getvalue()


def _read_template(template: bytes) -> tuple:
    """``(metadata.json, config, weights file, the members' date_time)`` of a template archive."""
    with zipfile.ZipFile(io.BytesIO(template)) as z:
        infos = z.infolist()
        if sorted(i.filename for i in infos) != sorted((_META, _CONFIG, _WEIGHTS)) or \
                any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            raise _Layout(f"archive members {[i.filename for i in infos]}")
        meta, config, h5 = (z.read(n) for n in (_META, _CONFIG, _WEIGHTS))
    config = json.loads(config)
    if not isinstance(config.get("config", {}).get("name"), str):
        raise _Layout("config.json does not hold the model's name")
    return meta, config, h5, infos[0].date_time


def _write(path, meta: bytes, config: dict, h5: bytes, date_time) -> None:
    """The archive, its members dated as the template's (a variant's bytes depend only on the template and its
    weights and name)."""
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
        for name, data in ((_META, meta), (_CONFIG, json.dumps(config)), (_WEIGHTS, h5)):
            info = zipfile.ZipInfo(name, date_time)
            info.external_attr = 0o600 << 16
            z.writestr(info, data)


def _save_with_keras(model, variants) -> None:
    """The plain way: per file, set the weights and the name on ``model``, save, restore."""
    name0 = model.name
    for path, name, weights in variants:
        saved = {n: model.get_layer(n).get_weights() for n in weights}
        try:
            for n, ws in weights.items():
                model.get_layer(n).set_weights(ws)
            if name is not None:
                model.name = name
            model.save(str(path))
        finally:
            model.name = name0
            for n, ws in saved.items():
                model.get_layer(n).set_weights(ws)


def template(model, folder) -> bytes | None:
    """``model`` saved by Keras (through ``model.save``, to a hidden file in ``folder``, removed afterwards) as
    the bytes of a ``.keras`` file, or None when Keras did not lay the archive out as :func:`write_variants`
    expects."""
    path = os.path.join(str(folder), f".template-{os.getpid()}-{id(model):x}.keras")
    try:
        model.save(path)
        with open(path, "rb") as f:
            data = f.read()
    finally:
        if os.path.exists(path):  # (also when model.save raised half-way)
            os.unlink(path)
    try:
        if _read_template(data)[1]["config"]["name"] != model.name:
            return None
    except _Layout:
        return None
    return data


def layer_weights(template: bytes, layer: str) -> list | None:
    """The weights of ``layer`` in a :func:`template`'s archive, as arrays; None when they cannot be told apart."""
    try:
        with h5py.File(io.BytesIO(_read_template(template)[2]), "r") as f:
            g = _var_groups(f).get(layer)
            if g is None or sorted(g.keys()) != [str(i) for i in range(len(g))]:
                return None
            return [np.asarray(g[str(i)][()]) for i in range(len(g))]
    except _Layout:
        return None


def write_variants(template: bytes, variants) -> bool:
    """Write one ``.keras`` file per variant of the model saved in ``template`` (:func:`template`), without Keras.

    ``variants`` as for :func:`save_variants`, each ``weights`` of the same shapes and dtypes as the template's.
    Returns False, writing nothing, when the archive is not laid out as this module expects.
    """
    try:
        meta, config, h5, date_time = _read_template(template)
        name0 = config["config"]["name"]
        files = []
        for path, name, weights in variants:
            cfg = config
            if name is not None and name != name0:
                cfg = dict(config, config=dict(config["config"], name=name))
            files.append((path, cfg, _patched_weights(h5, weights, name)))
    except _Layout:
        return False
    for path, cfg, data in files:
        _write(path, meta, cfg, data, date_time)
    return True


def save_variants(model, variants) -> None:
    """Write one ``.keras`` file per variant of ``model`` (which is left as it was).

    Parameters
    ----------
    model : keras.Model
    variants : sequence of (path, name, weights)
        ``path`` the file to write; ``name`` the model's name in it (None: ``model.name``); ``weights`` a dict
        {layer name: list of arrays} replacing those layers' weights (same shapes and dtypes as the layer's).

    Keras writes the model once (:func:`template`) to a hidden file next to the first one, removed afterwards.
    """
    variants = [(str(p), n, {k: [np.asarray(a) for a in ws] for k, ws in w.items()}) for p, n, w in variants]
    if not variants:
        return
    for _, _, weights in variants:  # wrong layer names or shapes are the caller's error, whatever the layout
        for n, ws in weights.items():
            current = model.get_layer(n).get_weights()
            if [(a.shape, a.dtype) for a in current] != [(a.shape, a.dtype) for a in ws]:
                raise ValueError(f"weights for layer {n!r} do not match its weights' shapes and dtypes")
    data = template(model, os.path.dirname(variants[0][0]) or ".")
    if data is None or not write_variants(data, variants):
        _save_with_keras(model, variants)

"""Saving several ``.keras`` files that differ from one model only in a few layers' weights and the model's name
(B'_X for each X, G_X for each X), serializing and tracing nothing per file.

A ``.keras`` file is a stored (uncompressed) zip of ``metadata.json``, ``config.json`` and ``model.weights.h5``,
where each layer's weights are the datasets ``0, 1, ...`` of an HDF5 group ``.../vars`` whose ``name`` attribute is
the layer's name, and the top-level ``vars`` group's ``name`` is the model's. :func:`save_variants` has Keras write
the model once, then writes each file as that archive with the given layers' datasets overwritten (same shapes and
dtypes) and the name replaced in ``config.json`` and in the weights file. When the archive Keras wrote is not laid
out like that (another Keras version), each file is written by Keras instead, the weights set on the model for the
save and restored after it. Either way every file opens with plain ``keras.models.load_model``.
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


def _read_template(path) -> tuple:
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if sorted(i.filename for i in infos) != sorted((_META, _CONFIG, _WEIGHTS)) or \
                any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            raise _Layout(f"archive members {[i.filename for i in infos]}")
        meta, config, h5 = (z.read(n) for n in (_META, _CONFIG, _WEIGHTS))
    return meta, json.loads(config), h5


def _write(path, meta: bytes, config: dict, h5: bytes) -> None:
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
        z.writestr(_META, meta)
        z.writestr(_CONFIG, json.dumps(config))
        z.writestr(_WEIGHTS, h5)


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


def save_variants(model, variants) -> None:
    """Write one ``.keras`` file per variant of ``model`` (which is left as it was).

    Parameters
    ----------
    model : keras.Model
    variants : sequence of (path, name, weights)
        ``path`` the file to write; ``name`` the model's name in it (None: ``model.name``); ``weights`` a dict
        {layer name: list of arrays} replacing those layers' weights (same shapes and dtypes as the layer's).

    Keras writes the model once to a hidden file next to the first one, removed afterwards.
    """
    variants = [(str(p), n, {k: [np.asarray(a) for a in ws] for k, ws in w.items()}) for p, n, w in variants]
    if not variants:
        return
    for _, _, weights in variants:  # wrong layer names or shapes are the caller's error, whatever the layout
        for n, ws in weights.items():
            current = model.get_layer(n).get_weights()
            if [(a.shape, a.dtype) for a in current] != [(a.shape, a.dtype) for a in ws]:
                raise ValueError(f"weights for layer {n!r} do not match its weights' shapes and dtypes")
    first = variants[0][0]
    template = os.path.join(os.path.dirname(first), f".{os.path.basename(first)}.template.keras")
    model.save(template)
    try:
        meta, config, h5 = _read_template(template)
        if config.get("config", {}).get("name") != model.name:
            raise _Layout("config.json does not hold the model's name")
        files = []
        for path, name, weights in variants:
            cfg = config
            if name is not None and name != model.name:
                cfg = dict(config, config=dict(config["config"], name=name))
            files.append((path, cfg, _patched_weights(h5, weights, name)))
    except _Layout:
        _save_with_keras(model, variants)
    else:
        for path, cfg, data in files:
            _write(path, meta, cfg, data)
    finally:
        os.unlink(template)

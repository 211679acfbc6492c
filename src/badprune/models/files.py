"""Model files before anything is deserialized: path checks, the format sniff and the architecture config read
(``.keras`` zip or HDF5), with the size cap on a ``.keras`` file's ``config.json`` (zip bombs) written once."""
from __future__ import annotations

import json
import os
import zipfile

import h5py

from ..errors import BadpruneError, short

#: a .keras file's config.json larger than this is refused before it is read (zip bombs)
MAX_CONFIG_BYTES = 64 << 20
#: one weight array declared larger than this is refused before it is read (a tiny compressed file can declare a
#: huge one; the largest layer of a model badprune is meant for is a few hundred MB)
MAX_WEIGHT_BYTES = 2 << 30


def check_h5_storage(f, path, what="weights") -> dict:
    """Refuse an HDF5 file (an open ``h5py.File``) whose links or datasets reach outside it: external links,
    external raw storage, virtual datasets; and datasets declared over :data:`MAX_WEIGHT_BYTES` or of a type
    that is not a number. Nothing is read but metadata. Returns {dataset path: dataset}."""
    fix = f"store the {what} in the file itself (re-save the model)"
    found, links = {}, []
    f.visititems_links(lambda name, link: links.append((name, link)))  # (an exception in it would be mangled)
    for name, link in links:
        if isinstance(link, h5py.ExternalLink):
            raise BadpruneError(f"'{name}' is a link to another file ({link.filename})", path, fix)
        if isinstance(link, h5py.SoftLink):
            continue  # its target is visited under its own name (a dangling one is never read)
        obj = f.get(name)
        if not isinstance(obj, h5py.Dataset):
            continue
        if obj.file.id != f.id:
            raise BadpruneError(f"'{name}' leads to another file", path, fix)
        if obj.external:
            raise BadpruneError(f"'{name}' is stored in external raw files, not in the HDF5 file", path, fix)
        if obj.is_virtual:
            raise BadpruneError(f"'{name}' is a virtual dataset that maps other files", path, fix)
        if obj.dtype.kind not in "fiub":
            raise BadpruneError(f"'{name}' holds {obj.dtype}, not numbers", path, fix)
        nbytes = obj.size * obj.dtype.itemsize if obj.shape is not None else 0
        if nbytes > MAX_WEIGHT_BYTES:
            raise BadpruneError(f"'{name}' declares {nbytes / 2 ** 30:.1f} GB of {what}, more than badprune "
                                f"reads ({MAX_WEIGHT_BYTES >> 30} GB)", path, "the file is damaged or hostile")
        found[name] = obj
    return found


def check_file(path, what="model file"):
    """``path`` as a string, checked to be an existing regular file (a folder or a missing file is refused)."""
    path = str(path)
    if not os.path.exists(path):
        raise BadpruneError(f"{what} not found", path, "check the path")
    if os.path.isdir(path):
        raise BadpruneError(f"expected a {what}, got a folder (TensorFlow SavedModel folders are not supported)",
                            path, "save the model as .keras or .h5")
    if not os.path.isfile(path):
        raise BadpruneError(f"the {what} is not a regular file", path, "pass a .keras or .h5 file")
    return path


def is_keras3_weights(g) -> bool:
    """A Keras 3 ``.weights.h5`` file: groups ``layers/<name>/vars`` and no Keras 2 ``layer_names``."""
    return "layer_names" not in g.attrs and isinstance(g.get("layers"), h5py.Group) \
        and ("vars" in g or any(isinstance(v, h5py.Group) and "vars" in v for v in g["layers"].values()))


def read_model_config(path) -> tuple[str, dict]:
    """Return ('keras' | 'h5', config) for a model file, without deserializing anything."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                if "config.json" not in z.namelist():
                    raise BadpruneError("zip file without config.json: not a .keras model", path,
                                        "save the model with model.save('model.keras')")
                if z.getinfo("config.json").file_size > MAX_CONFIG_BYTES:
                    raise BadpruneError(f"the .keras file's config.json is over {MAX_CONFIG_BYTES >> 20} MB", path,
                                        "re-save the model with model.save('model.keras')")
                raw = z.read("config.json")
            return "keras", json.loads(raw)
        except BadpruneError:
            raise
        except Exception as e:
            raise BadpruneError(f"cannot read the .keras file ({short(e)})", path,
                                "re-save the model with model.save('model.keras')") from None
    if not h5py.is_hdf5(path):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            raise BadpruneError("damaged or incomplete .keras file (a zip without its directory)", path,
                                "copy the file again, or re-save it with model.save('model.keras')")
        raise BadpruneError("not a Keras model file (neither .keras zip nor HDF5)", path,
                            "pass a .keras or .h5 model saved with model.save()")
    try:
        with h5py.File(path, "r") as f:
            big = BadpruneError(f"the .h5 file's model_config is over {MAX_CONFIG_BYTES:,} bytes", path,
                                "re-save the model with model.save()")
            if "model_config" in f.attrs and h5py.h5a.open(f.id, b"model_config").get_storage_size() \
                    > MAX_CONFIG_BYTES:  # a fixed-length string: refused unread
                raise big
            raw = f.attrs.get("model_config")  # (a variable-length one is in the file: no larger than it)
            if raw is not None and len(raw) > MAX_CONFIG_BYTES:
                raise big
            looks_weights = raw is None and ("layer_names" in f.attrs or "layers" in f)
            keras3_weights = raw is None and is_keras3_weights(f)
    except BadpruneError:
        raise
    except Exception as e:
        raise BadpruneError(f"cannot read the HDF5 file ({short(e)})", path, "check the file is complete") from None
    if raw is None:
        if keras3_weights:
            raise BadpruneError("this file holds only Keras 3 weights, no architecture", path,
                                "pass the .keras model file saved with model.save('model.keras')")
        if looks_weights:
            raise BadpruneError("this file holds only weights, no architecture", path,
                                "pass it as --weights with --arch deepid")
        raise BadpruneError("HDF5 file without a model config: not a Keras model", path,
                            "pass a model saved with model.save()")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        return "h5", json.loads(str(raw))
    except Exception as e:
        raise BadpruneError(f"the model config is not valid JSON ({short(e)})", path) from None

"""The zoo's manifest: read, checked whole before anything runs (one error line naming the run and the key)."""
from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadpruneError, printable, short
from ..runfiles import check_model_source, jsonable

#: the resolved manifest entry, inside each run folder the zoo wrote (compared on the next invocation)
ENTRY_JSON = "zoo-entry.json"
ZOO_CSV, ZOO_MD, ZOO_JSON, ZOO_PNG = "zoo.csv", "zoo.md", "zoo.json", "zoo.png"
#: what to install for the zoo (the one line printed when Ray is missing)
INSTALL_FIX = 'pip install "badprune[cluster]"'


# ------------------------------------------------------------------------------------------------ manifest keys
#: the keys of :func:`badprune.sweep.run` a manifest may set (its other parameters belong to the zoo: cache_dir,
#: progress, name, log)
_SWEEP_KEYS = ("model", "weights", "arch", "valid", "test", "poisoned", "layer", "thresholds", "relative", "order",
               "scale", "mode", "trust_model", "fine_tune", "fine_tune_epochs", "fine_tune_lr", "seed", "batch_size",
               "use_cache")
#: every manifest key of a run (besides ``name``): the sweep's keys and ``no_models`` (write no B'_X / G_X files)
KEYS = _SWEEP_KEYS + ("no_models",)
#: keys holding paths (relative to the manifest's folder)
PATH_KEYS = ("model", "weights", "valid", "test", "poisoned")
_STR_KEYS = PATH_KEYS + ("arch", "layer", "order", "mode", "fine_tune")
_BOOL_KEYS = ("relative", "trust_model", "use_cache", "no_models")
_INT_KEYS = ("fine_tune_epochs", "seed", "batch_size")
#: names a run may not take: the zoo's own files in ``out``
_RESERVED = {ENTRY_JSON, ZOO_CSV, ZOO_MD, ZOO_JSON, ZOO_PNG}
_FLAG = re.compile(r"--([a-z][a-z-]*)")


def _defaults() -> dict:
    """Every key's default: :func:`badprune.sweep.run`'s own (read from its signature), ``no_models`` False."""
    from ..sweep import run

    params = inspect.signature(run).parameters
    d = {k: params[k].default for k in _SWEEP_KEYS}
    d["thresholds"] = [float(x) for x in d["thresholds"]]
    d["no_models"] = False
    return d


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class ZooEntry:
    """One ``[[run]]`` of a manifest, checked and resolved.

    ``options`` holds every key of :data:`KEYS` (the defaults filled in, paths absolute); ``given`` the run's
    values as written in the manifest (defaults merged, paths as written).
    """

    name: str
    options: dict
    given: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The model as the manifest names it (model file, else weight file)."""
        return self.given.get("model") or self.given.get("weights") or ""

    def sweep_kwargs(self) -> dict:
        """The keyword arguments of :func:`badprune.sweep.run` for this run."""
        return {k: self.options[k] for k in _SWEEP_KEYS}

    def record(self) -> dict:
        """The resolved entry as plain JSON (what ``zoo-entry.json`` keeps and the next invocation compares)."""
        return jsonable({"name": self.name, **self.options})


@dataclass
class Manifest:
    """A checked manifest: its ``path`` (absolute), the ``defaults`` as written and the :class:`ZooEntry` runs."""

    path: str
    defaults: dict
    entries: list

    @property
    def default_out(self) -> str:
        """``runs/<manifest stem>``."""
        return os.path.join("runs", Path(self.path).stem)


def _where(name) -> str:
    return "manifest [defaults]" if name is None else f"manifest run '{name}'"


def _keyed(where: str, key: str, e: BadpruneError, path: str) -> BadpruneError:
    """A library check's error, said in manifest terms: prefixed with the run and the key, flags named as keys."""
    def keys(text):
        if not text:
            return text
        return _FLAG.sub(lambda m: f"'{m.group(1).replace('-', '_')}'", text)

    return BadpruneError(f"{where}: key '{key}': {keys(e.what)}", path, keys(e.fix))


def _check_types(table: dict, name, path: str, allowed) -> None:
    """Unknown keys and value types of one table (``[defaults]`` or a ``[[run]]``)."""
    where = _where(name)
    for key, v in table.items():
        if key not in allowed:
            raise BadpruneError(f"{where}: unknown key '{key}'", path, f"use one of: {', '.join(allowed)}")
        bad = None
        if key in _STR_KEYS and (not isinstance(v, str) or not v):
            bad = "a non-empty string"
        elif key in _BOOL_KEYS and not isinstance(v, bool):
            bad = "true or false"
        elif key in _INT_KEYS and not (isinstance(v, int) and not isinstance(v, bool)):
            bad = "a whole number"
        elif key == "fine_tune_lr" and not _is_number(v):
            bad = "a number"
        elif key == "scale" and not (isinstance(v, str) or _is_number(v)):
            bad = "auto, raw, unit or a positive number"
        elif key == "thresholds" and not (isinstance(v, list) and v and all(_is_number(x) for x in v)):
            bad = "a list of numbers, e.g. [2, 4, 10]"
        if bad:
            raise BadpruneError(f"{where}: key '{key}' is {_show(v)}", path, f"'{key}' takes {bad}")


def _show(v) -> str:
    if isinstance(v, dict):
        return "a table"
    text = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_name(name, index: int, path: str, seen: dict) -> str:
    where = f"manifest run #{index}"
    if name is None:
        raise BadpruneError(f"{where}: key 'name' is missing", path, 'give each [[run]] a name = "..." (its folder)')
    if not isinstance(name, str):
        raise BadpruneError(f"{where}: key 'name' is {_show(name)}", path, "'name' takes a string (a folder name)")
    plain = (name and name == name.strip() and name not in (".", "..") and not name.startswith(".")
             and not any(c in name for c in "/\\\0") and printable(name) == name and len(name) <= 100
             and name not in _RESERVED)
    if not plain:
        raise BadpruneError(f"{where}: key 'name' {name!r} is not a plain folder name", path,
                            "use letters, digits, '-', '_' and '.' (no '/', not starting with '.', not a "
                            "name of the zoo's own files)")
    if name.casefold() in seen:
        raise BadpruneError(f"manifest run '{name}': key 'name' is also run #{seen[name.casefold()]}'s", path,
                            "give every run its own name")
    seen[name.casefold()] = index
    return name


def _check_values(opts: dict, given: dict, where: str, path: str) -> None:
    """The sweep's own argument checks (:func:`badprune.runfiles.check_model_source`, the sweep's threshold,
    order, scale and batch-size checks, :func:`badprune.repair.check_args`) on a merged run."""
    from .. import repair, sweep

    source = {k: opts[k] for k in ("model", "weights", "arch")}
    if source["model"] is not None and source["weights"] is not None:
        key = "weights"
    elif source["model"] is None and source["weights"] is None:
        key = "model"
    else:
        key = "arch"
    try:
        check_model_source(**source, missing_fix='add model = "bd_net.h5", or weights = "bd_weights.h5" and '
                                                'arch = "deepid"')
    except BadpruneError as e:
        raise _keyed(where, key, e, path) from None
    checks = (("thresholds", sweep._check_thresholds), ("order", sweep._check_order),
              ("scale", sweep._check_scale), ("batch_size", sweep._check_batch_size))
    for key, check in checks:
        try:
            out = check(opts[key])
        except BadpruneError as e:
            raise _keyed(where, key, e, path) from None
        if key == "thresholds":
            opts[key] = out
    if opts["valid"] is None:
        raise BadpruneError(f"{where}: key 'valid' is missing", path,
                            'add valid = "valid.h5" (the clean validation set) to the run or to [defaults]')
    if opts["fine_tune"] is None:
        extra = [k for k in ("fine_tune_epochs", "fine_tune_lr") if k in given]
        if extra:
            raise BadpruneError(f"{where}: key '{extra[0]}' goes with 'fine_tune'", path,
                                "add fine_tune = \"head\" or drop the key")
    else:
        try:
            repair.check_args(opts["fine_tune"], opts["fine_tune_epochs"], opts["fine_tune_lr"], opts["seed"])
        except BadpruneError as e:
            raise _keyed(where, "fine_tune", e, path) from None


def _resolve(v: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(v)))


def parse_manifest(doc: dict, path: str) -> Manifest:
    """Check and resolve a manifest already parsed from TOML (``doc``); ``path`` names it in errors and is the
    base of relative paths. See :func:`read_manifest`."""
    path = os.path.abspath(str(path))
    base = os.path.dirname(path)
    for key in doc:
        if key not in ("defaults", "run"):
            raise BadpruneError(f"manifest: unknown table '{key}'", path,
                                "use a [defaults] table and one [[run]] table per model")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise BadpruneError("manifest: 'defaults' is not a table", path, "write it as a [defaults] table")
    runs = doc.get("run")
    if runs is None or runs == []:
        raise BadpruneError("manifest has no runs", path, 'add a [[run]] table with name = "..." per model')
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise BadpruneError("manifest: 'run' is not a list of tables", path,
                            "write each model as a [[run]] table (two brackets)")
    _check_types(defaults, None, path, KEYS)
    base_opts = _defaults()
    seen, entries = {}, []
    for i, table in enumerate(runs, 1):
        name = _check_name(table.get("name"), i, path, seen)
        table = {k: v for k, v in table.items() if k != "name"}
        _check_types(table, name, path, KEYS)
        given = {**defaults, **table}
        opts = {**base_opts, **given}
        for k in PATH_KEYS:
            if opts[k] is not None:
                opts[k] = _resolve(opts[k], base)
        _check_values(opts, given, _where(name), path)
        entries.append(ZooEntry(name, opts, given))
    return Manifest(path, dict(defaults), entries)


def read_manifest(path) -> Manifest:
    """Read and check a zoo manifest (TOML).

    Parameters
    ----------
    path : str or path
        The ``.toml`` file: a ``[defaults]`` table and ``[[run]]`` tables, each with a ``name`` (its folder) and
        any of :data:`KEYS`; a run's keys override the defaults; paths are relative to the manifest's folder.

    Returns
    -------
    Manifest

    Raises
    ------
    BadpruneError
        For an unreadable file, bad TOML, an unknown key, a run without a model, a value of the wrong type or one
        the sweep's own checks refuse, a missing, duplicate or unsafe name: one line naming the run and the key.
    """
    import tomllib

    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise BadpruneError("manifest not found", path, "pass the path of a .toml manifest") from None
    except OSError as e:
        raise BadpruneError(f"cannot read the manifest ({e.strerror or e})", path, "check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadpruneError(f"the manifest is not valid TOML ({short(e)})", path, "fix its syntax") from None
    return parse_manifest(doc, path)

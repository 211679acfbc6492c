"""The zoo's manifest: read, checked whole before anything runs (one error line naming the run and the key)."""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import options
from ..errors import BadpruneError, ParamError, printable, short
from ..runfolder import jsonable

#: the resolved manifest entry, inside each run folder the zoo wrote (compared on the next invocation)
ENTRY_JSON = "zoo-entry.json"
ZOO_CSV, ZOO_MD, ZOO_JSON, ZOO_PNG = "zoo.csv", "zoo.md", "zoo.json", "zoo.png"
#: what to install for the zoo (the one line printed when Ray is missing)
INSTALL_FIX = 'pip install "badprune[cluster]"'


# ------------------------------------------------------------------------------------------------ manifest keys
#: the keys of :func:`badprune.defense.run` a manifest may set (its other parameters belong to the zoo: cache_dir,
#: progress, name, log)
_SWEEP_KEYS = ("model", "weights", "arch", "valid", "test", "poisoned", "layer", "thresholds", "relative", "order",
               "scale", "mode", "fine_tune", "fine_tune_epochs", "fine_tune_lr", "seed", "batch_size", "use_cache",
               "scan")
#: sweep keys only the user's own flag sets (``zoo --trust-model``), never a manifest: a shared manifest must not
#: switch on code execution
USER_ONLY = ("trust_model",)
#: every manifest key of a run (besides ``name``): the sweep's keys and ``no_models`` (write no B'_X / G_X files)
KEYS = _SWEEP_KEYS + ("no_models",)
#: the manifest key of each parameter (:mod:`badprune.options` names parameters; a manifest's keys are the same)
KEY_OF = {k: k for k in KEYS}
#: each key's value type (:data:`badprune.options.TYPES`, and ``no_models``)
_TYPES = {**options.TYPES, "no_models": "bool"}
#: keys holding paths (relative to the manifest's folder)
PATH_KEYS = tuple(k for k in _SWEEP_KEYS if options.TYPES[k] == "path")
#: names a run may not take: the zoo's own files in ``out``
_RESERVED = {ENTRY_JSON, ZOO_CSV, ZOO_MD, ZOO_JSON, ZOO_PNG}


def _spell(name: str, value: str | None) -> str:
    """A parameter as a manifest writes it: ``'fine_tune_epochs'``, ``fine_tune_epochs = 10``."""
    key = KEY_OF.get(name, name)
    return f"'{key}'" if value is None else f"{key} = {value}"


def _defaults() -> dict:
    """Every key's default: :func:`badprune.defense.run`'s own (read from its signature), ``no_models`` False."""
    from ..defense import run

    params = inspect.signature(run).parameters
    d = {k: params[k].default for k in _SWEEP_KEYS + USER_ONLY}
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
        """The keyword arguments of :func:`badprune.defense.run` for this run."""
        return {k: self.options[k] for k in _SWEEP_KEYS + USER_ONLY}

    def to_json(self) -> dict:
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


def _keyed(where: str, e: ParamError, path: str) -> BadpruneError:
    """A parameter check's error, said in manifest terms: prefixed with the run and the key, parameters named as
    keys (:data:`KEY_OF`)."""
    e = e.spelled(_spell)
    return BadpruneError(f"{where}: key '{KEY_OF.get(e.param, e.param)}': {e.what}", path, e.fix)


#: what each value type of :data:`badprune.options.TYPES` accepts, and how the error says it
_TYPE_RULES = {
    "path": (lambda v: isinstance(v, str) and v, "a non-empty string"),
    "str": (lambda v: isinstance(v, str) and v, "a non-empty string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "number": (lambda v: _is_number(v), "a number"),
    "scale": (lambda v: isinstance(v, str) or _is_number(v), "auto, raw, unit or a positive number"),
    "thresholds": (lambda v: isinstance(v, list) and v and all(_is_number(x) for x in v),
                   "a list of numbers, e.g. [2, 4, 10]"),
}


def _check_types(table: dict, name, path: str, allowed) -> None:
    """Unknown keys and value types of one table (``[defaults]`` or a ``[[run]]``)."""
    where = _where(name)
    for key, v in table.items():
        if key in USER_ONLY:
            raise BadpruneError(f"{where}: key '{key}' is not accepted in a manifest (it would let the models' files "
                                "run code)", path, "remove it; pass --trust-model to `badprune-fast zoo` yourself "
                                "to trust every model of this manifest")
        if key not in allowed:
            raise BadpruneError(f"{where}: unknown key '{key}'", path, f"use one of: {', '.join(allowed)}")
        ok, takes = _TYPE_RULES[_TYPES[key]]
        bad = None if ok(v) else takes
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


def _check_values(opts: dict, where: str, path: str) -> None:
    """The parameters' own rules (:func:`badprune.options.check_run`) on a merged run, before anything runs; the
    thresholds normalized."""
    try:
        checked = options.check_run(
            opts["model"], opts["weights"], opts["arch"], opts["valid"],
            **{k: opts[k] for k in ("thresholds", "order", "scale", "batch_size", "mode", "fine_tune",
                                    "fine_tune_epochs", "fine_tune_lr", "seed")},
            missing_fix='add {model="bd_net.h5"}, or {weights="bd_weights.h5"} and {arch="deepid"}')
    except ParamError as e:
        if e.param == "valid":  # a required key: said as such
            raise BadpruneError(f"{where}: key 'valid' is missing", path,
                                'add valid = "valid.h5" (the clean validation set) to the run or to [defaults]') \
                from None
        raise _keyed(where, e, path) from None
    opts["thresholds"] = checked["thresholds"]


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
        _check_values(opts, _where(name), path)
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
        the parameters' rules (:mod:`badprune.options`) refuse, a missing, duplicate or unsafe name: one line
        naming the run and the key.
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

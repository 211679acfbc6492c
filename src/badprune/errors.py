"""The one error type every user-facing failure raises (the CLI turns it into one line and exit 2), and warnings.

Errors: :class:`BadpruneError` ``(what, file, fix)``; :class:`ParamError`, one of them, for a bad parameter (it
names the parameter, ``param``, and each front end words it: flags on the command line, keys in a manifest). The
CLI prints ``error: <what> (<file>): <how to fix>`` on one line and exits 2; any other exception is an internal
fault (one line, exit 1; ``--debug`` shows the traceback).

Warnings: something suspicious that does not stop the run and never changes its results (e.g. a base accuracy
under 50 %, an attack success rate that would be meaningless) is reported with :func:`warn`, which issues a
standard Python warning of category :class:`BadpruneWarning`. Library callers can record, filter or escalate
them like any warning (``warnings.simplefilter("error", BadpruneWarning)``, ``pytest.warns``); the CLI shows each
one as a single ``warning: <message>`` line on stderr through :func:`cli_warnings`.

Every message is made printable on one line (:func:`printable`): model files and data files come from people the
user should not trust, and a layer name or path holding newlines or terminal escape sequences must not be able to
forge extra output lines or drive the terminal.
"""
from __future__ import annotations

import contextlib
import re
import string
import sys
import unicodedata
import warnings

#: ANSI colour/bold sequences (Keras puts bold markers in its messages): dropped; other escapes are shown escaped
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def printable(s) -> str:
    """``s`` as one printable line: ANSI colour sequences dropped, line breaks and tabs as spaces, other control and
    format characters (escape, bidi overrides, ...) shown escaped (``\\x1b``, ``\\u202e``)."""
    s = _SGR.sub("", str(s))
    out = []
    for ch in s:
        if ch in "\n\r\t\v\f":
            out.append(" ")
        elif unicodedata.category(ch)[0] == "C":
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else (f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"))
        else:
            out.append(ch)
    return "".join(out)


class BadpruneError(Exception):
    """A failure caused by the user's input or usage.

    ``what`` says what is wrong, ``file`` names the file concerned (if any) and ``fix`` says how to fix it.
    ``str(err)`` is the one-line form the CLI prints after ``error: ``.
    """

    exit_code = 2

    def __init__(self, what: str, file: str | None = None, fix: str | None = None):
        self.what = what
        self.file = None if file is None else str(file)
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        s = printable(self.what)
        if self.file:
            s += f" ({printable(self.file)})"
        if self.fix:
            s += f": {printable(self.fix)}"
        return s


class _Spelling(string.Formatter):
    """Fills :class:`ParamError`'s templates: ``{name}`` is a parameter's name and ``{name=value}`` an example
    setting of it, both as ``spell(name, value)`` (value None for a bare name). The whole field is the parameter
    (values may hold dots)."""

    def __init__(self, spell):
        super().__init__()
        self.spell = spell

    def get_field(self, field_name, args, kwargs):
        name, eq, value = field_name.partition("=")
        return self.spell(name, value if eq else None), field_name


def python_spelling(name: str, value: str | None) -> str:
    """A parameter as a Python caller writes it: ``fine_tune_epochs``, ``fine_tune_epochs=10``."""
    return name if value is None else f"{name}={value}"


class ParamError(BadpruneError):
    """A bad parameter value. ``param`` is the parameter's name (a keyword argument of the API, e.g.
    ``fine_tune_epochs``); ``what`` and ``fix`` are templates that name parameters as ``{name}`` and example
    settings as ``{name=value}`` (value as a Python literal; literal braces doubled), so each front end words the
    message in its own terms with :meth:`spelled` (the CLI's flags, the zoo's TOML keys), without parsing text.
    Raised spelled for Python callers (:func:`python_spelling`)."""

    def __init__(self, param: str, what: str, fix: str | None = None, file: str | None = None,
                 spell=python_spelling):
        self.param = param
        self.template = (what, fix)
        fill = _Spelling(spell).format
        super().__init__(fill(what), file, None if fix is None else fill(fix))

    def spelled(self, spell) -> "ParamError":
        """The same error worded by ``spell(name, value)`` (value None for a bare name)."""
        return ParamError(self.param, *self.template, file=self.file, spell=spell)


def literal(v) -> str:
    """A value to put inside a :class:`ParamError` template as text (its braces doubled)."""
    return str(v).replace("{", "{{").replace("}", "}}")


def short(e: BaseException, limit: int = 200) -> str:
    """An exception as ``Type: message`` on one line, cut to ``limit`` characters (for error messages)."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class BadpruneWarning(UserWarning):
    """Something suspicious in the input that does not stop the run (see :func:`warn`)."""


def warn(message: str, stacklevel: int = 2) -> str:
    """Issue ``message`` as a :class:`BadpruneWarning` (one printable line). Returns the message as issued."""
    message = printable(message)
    warnings.warn(BadpruneWarning(message), stacklevel=stacklevel + 1)
    return message


def _show_one_line(message, category, filename, lineno, file=None, line=None):
    stream = sys.stderr if file is None else file
    try:
        if issubclass(category, BadpruneWarning):
            stream.write(f"warning: {printable(message)}\n")
        else:
            stream.write(warnings.formatwarning(message, category, filename, lineno, line))
        stream.flush()
    except (OSError, ValueError, AttributeError):  # no usable stderr
        pass


@contextlib.contextmanager
def cli_warnings():
    """For the command line: every :class:`BadpruneWarning` is shown (each time) as one ``warning: ...`` line on
    stderr while the block runs; other warnings keep Python's usual filters and format."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", BadpruneWarning)
        warnings.showwarning = _show_one_line
        yield

"""An allow-list unpickler for EventGPT's pickled ``.npy`` files.

EventGPT ships its samples as ``np.save`` of a Python dict ``{x, y, t, p}``: a ``.npy`` whose
payload is a *pickle*. Plain unpickling runs whatever callables the file names (the classic
``os.system`` payload), so a file downloaded from a dataset mirror could run code the moment
it is opened. :class:`SafeUnpickler` rebuilds only what such a file needs:

- NumPy arrays, dtypes and scalars, in both spellings: NumPy 1.x writes
  ``numpy.core.multiarray._reconstruct`` / ``scalar`` (and ``numpy.core.numeric._frombuffer``
  at protocol 5), NumPy 2.x writes ``numpy._core.*``; both resolve to the installed NumPy's
  own functions, so either pickle loads under either NumPy;
- ``numpy.ndarray`` and ``numpy.dtype`` (the arguments of ``_reconstruct`` / ``dtype``);
- plain containers that need a global at some protocol (``set``, ``frozenset``, ``complex``,
  ``collections.OrderedDict``; dicts, lists, tuples, strings, bytes and numbers need none);
- ``_codecs.encode(text, "latin1")``, which protocols 0-2 use to carry ``bytes`` (array data);
  any other codec is refused.

Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any class with a
``__reduce__``) is refused by :meth:`SafeUnpickler.find_class` *before* it is looked up, so
nothing named by the file is imported or called. See the "Restricting Globals" section of
Python's ``pickle`` documentation for the mechanism.

What the allow-list cannot rule out is an object array (``dtype=object``) that holds the
allowed objects; :func:`load_pickle` refuses object arrays other than the 0-d holder
``np.save`` writes around a dict, and the event readers refuse non-numeric arrays.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.errors import InputError

TRUST_HINT = (
    "pass --trust-pickle (read_events(..., trust_pickle=True)) only if you trust the file, "
    "or convert it to a pickle-free format with `stagewise convert FILE --out DIR`"
)
"""How to get past a refusal; part of every refusal message."""


def _numpy_attr(module: str, name: str) -> Any:
    """``name`` from NumPy's private core module, whichever of ``numpy._core`` (2.x) and
    ``numpy.core`` (1.x) the installed NumPy has."""
    import importlib

    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"numpy has no {module}.{name}")


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to what protocols 0-2 need: ``str`` -> ``bytes`` in latin-1."""
    if not isinstance(obj, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1", errors)


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}
    for module, names in (("multiarray", ("_reconstruct", "scalar")), ("numeric", ("_frombuffer",))):
        for name in names:
            obj = _numpy_attr(module, name)
            for prefix in ("numpy.core", "numpy._core"):
                table[(f"{prefix}.{module}", name)] = obj
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for name, obj in (("set", set), ("frozenset", frozenset), ("complex", complex)):
        table[("builtins", name)] = obj
    table[("collections", "OrderedDict")] = collections.OrderedDict
    table[("_codecs", "encode")] = _latin1_encode
    return table


class SafeUnpickler(pickle._Unpickler):
    """A pickle unpickler whose globals come only from an allow-list (module doc).

    It extends Python's pure-Python unpickler (``pickle._Unpickler``) rather than the C one:
    the pure-Python memo is a dict, so a crafted ``LONG_BINPUT 0xFFFFFFF0`` cannot make it
    allocate and zero a memo table of billions of slots; EventGPT pickles are a handful of
    opcodes around large byte strings, so the speed is the same.

    Args:
        file: a binary file object positioned at the pickle.
        path: the file it came from, named in the refusal.

    Raises (from :meth:`load`):
        InputError: the pickle names a global outside the allow-list; the message names it
            and says how to opt in or convert (:data:`TRUST_HINT`).
        pickle.UnpicklingError, EOFError, ValueError, ...: a malformed pickle (callers turn
            these into :class:`InputError`).
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def __init__(self, file: Any, path: str | Path | None) -> None:
        # latin1: NumPy arrays pickled by Python 2 carry their data as str8 (NumPy's advice).
        super().__init__(file, encoding="latin1")
        self._path = path
        if SafeUnpickler._ALLOWED is None:
            SafeUnpickler._ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for ``module.name``, else refuse (nothing is imported)."""
        table = SafeUnpickler._ALLOWED
        assert table is not None
        key = (module, name)
        if key not in table:  # Python 2 names (``__builtin__.set``), as pickle's fix_imports maps them
            if key in _compat_pickle.NAME_MAPPING:
                key = _compat_pickle.NAME_MAPPING[key]
            elif module in _compat_pickle.IMPORT_MAPPING:
                key = (_compat_pickle.IMPORT_MAPPING[module], name)
        if key in table:
            return table[key]
        shown = f"{module}.{name}"[:120]
        raise InputError(
            self._path,
            f"is a pickle that names {shown!r}, which stagewise does not load by default "
            f"(a pickle can run code when loaded; only NumPy arrays and plain containers are allowed); {TRUST_HINT}",
        )

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (a pickle of plain data has none)."""
        raise InputError(self._path, f"is a pickle with persistent ids, which stagewise does not load by default; {TRUST_HINT}")


def load_pickle(data: bytes, path: str | Path | None) -> Any:
    """Unpickle ``data`` through :class:`SafeUnpickler` and check what came out.

    Args:
        data: the pickle's bytes (the whole of a raw pickle, or what follows a ``.npy``
            header). Reading from memory keeps a corrupt length field from asking the file
            layer for more bytes than the file has.
        path: the file, for messages.

    Returns:
        The unpickled object. A 0-d object array (what ``np.save`` writes around a dict) is
        unwrapped to the object it holds.

    Raises:
        InputError: a refused global (see :class:`SafeUnpickler`), an object array other than
            that 0-d holder, or a malformed pickle (one line with the exception type).
    """
    try:
        obj = SafeUnpickler(io.BytesIO(data), path).load()
    except InputError:
        raise
    except RecursionError:
        raise InputError(path, "not a readable pickle (nested too deeply)") from None
    except Exception as err:  # noqa: BLE001  any malformed pickle: UnpicklingError, EOFError, ValueError, TypeError, ...
        text = " ".join(str(err).split())[:200]
        raise InputError(path, f"not a readable pickle ({type(err).__name__}: {text})") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise InputError(path, f"holds an object array of shape {obj.shape}; stagewise reads only numeric arrays from a pickle; {TRUST_HINT}")
    return obj

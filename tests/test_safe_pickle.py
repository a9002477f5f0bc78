"""Opening a file must not run code: EventGPT's pickled .npy through the allow-list unpickler.

Every crafted payload below would create the file ``marker`` when unpickled by plain
``pickle``/``np.load(allow_pickle=True)`` (the last test proves that the payloads are live);
by default stagewise must refuse each with one ``InputError`` line and the marker must not exist.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess

import numpy as np
import pytest
from conftest import SAMPLE_NPY, require

from stagewise.cli import main
from stagewise.errors import InputError
from stagewise.inputs.events import read_events
from stagewise.inputs.safe_pickle import SafeUnpickler, load_pickle


class OsSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Eval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w').close()",))


class Popen:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


class Harmless:
    """Any class at all (no code in it): refused too, since it is not a NumPy type."""

    def __init__(self, marker):
        self.marker = str(marker)


PAYLOADS = [OsSystem, Eval, Popen]


def events_dict(n: int = 50) -> dict:
    rng = np.random.default_rng(0)
    return {
        "x": rng.integers(0, 640, n).astype(np.uint16),
        "y": rng.integers(0, 480, n).astype(np.uint16),
        "t": np.sort(rng.integers(0, 40_000, n)).astype(np.uint16),
        "p": rng.integers(0, 2, n).astype(np.uint8),
    }


def npy_with_pickle(path, obj, protocol: int):
    """What ``np.save(path, np.array(obj, dtype=object))`` writes, at a chosen pickle protocol."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(arr, fh, protocol=protocol)
    return path


def assert_refused(path, marker, *fragments):
    with pytest.raises(InputError) as err:
        read_events(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    for f in ("--trust-pickle", "stagewise convert", *fragments):
        assert f in text, f"{f!r} not in {text!r}"
    assert not os.path.exists(marker), "the payload ran"


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_payload_in_a_dict_value_does_not_run(tmp_path, payload, protocol):
    marker = tmp_path / "marker"
    d = events_dict()
    d["p"] = payload(marker)  # nested: the payload is one value of EventGPT's dict
    assert_refused(npy_with_pickle(tmp_path / "evil.npy", d, protocol), marker)


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_headerless_pickle_named_npy_does_not_run(tmp_path, payload, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "raw.npy"
    path.write_bytes(pickle.dumps(payload(marker), protocol=protocol))
    assert_refused(path, marker)


def test_any_class_is_refused_and_named(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "obj.npy"
    path.write_bytes(pickle.dumps({"x": Harmless(marker)}))
    assert_refused(path, marker, "Harmless")


def test_hand_written_global_opcodes_are_refused(tmp_path):
    # protocol-0 GLOBAL + REDUCE, INST, and a codec other than latin1 for _codecs.encode
    marker = tmp_path / "marker"
    cases = {
        "global.npy": f"cos\nsystem\n(Vtouch {marker}\ntR.".encode(),
        "inst.npy": f"(Vtouch {marker}\nios\nsystem\n.".encode(),
        "codec.npy": b"c_codecs\nencode\n(Vabc\nVrot13\ntR.",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError) as err:
            read_events(path)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: "), str(err.value)
        assert not marker.exists()


def test_object_arrays_of_anything_are_refused(tmp_path):
    path = npy_with_pickle(tmp_path / "objarr.npy", np.array([{"x": 1}, "s"], dtype=object), 3)
    with pytest.raises(InputError) as err:
        read_events(path)
    assert "object array" in str(err.value)
    d = events_dict()
    d["x"] = np.array([1] * 49 + ["two"], dtype=object)  # a value that is an object array
    with pytest.raises(InputError) as err:
        read_events(npy_with_pickle(tmp_path / "objval.npy", d, 3))
    assert "x must hold integers" in str(err.value)


def _as_numpy1(data: bytes) -> bytes:
    """A NumPy-2 pickle rewritten the way NumPy 1.x writes it (``numpy.core.*``).

    Protocols 0-3 name globals as ``module\\nname\\n`` text; 4-5 push the module as a short
    unicode string whose one-byte length must change with it.
    """
    out = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n").replace(b"numpy._core.numeric\n", b"numpy.core.numeric\n")
    for mod in (b"multiarray", b"numeric"):
        new, old = b"numpy.core." + mod, b"numpy._core." + mod
        out = out.replace(bytes([0x8C, len(old)]) + old, bytes([0x8C, len(new)]) + new)
    return out


@pytest.mark.parametrize("protocol", range(6))
def test_numpy1_and_numpy2_pickles_load(tmp_path, protocol):
    d = events_dict()
    arr = np.empty((), dtype=object)
    arr[()] = d
    data2 = pickle.dumps(arr, protocol=protocol)
    data1 = _as_numpy1(data2)
    assert b"numpy.core" in data1 and b"numpy._core" not in data1
    for data in (data1, data2):
        got = load_pickle(data, "x.npy")
        assert sorted(got) == sorted(d)
        for k in d:
            np.testing.assert_array_equal(got[k], d[k])
            assert got[k].dtype == d[k].dtype
    path = tmp_path / "np1.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(data1)
    s = read_events(path)
    np.testing.assert_array_equal(s.events["x"], d["x"])
    np.testing.assert_array_equal(np.sort(s.events["t"]), np.sort(d["t"]))


def test_numpy_scalars_and_plain_containers_load():
    obj = {"n": np.int64(7), "f": np.float32(1.5), "s": {1, 2}, "fs": frozenset({3}), "c": complex(1, 2), "l": [1, (2, 3)], "b": b"\x00\xff"}
    for protocol in range(6):
        assert load_pickle(pickle.dumps(obj, protocol=protocol), "x") == obj


def test_real_sample_loads_exactly_as_plain_numpy():
    path = require(SAMPLE_NPY)
    ref = np.load(path, allow_pickle=True).item()
    safe = read_events(path, sensor_size=(480, 640))
    trusted = read_events(path, sensor_size=(480, 640), trust_pickle=True)
    np.testing.assert_array_equal(safe.events, trusted.events)
    for k in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(safe.events[k], ref[k])
    assert len(safe) == 132_268 and safe.notes == ()


def test_trust_pickle_is_plain_numpy(tmp_path):
    # The opt-in really is the old behaviour: the same payload runs (which is why it is off).
    marker = tmp_path / "marker"
    d = events_dict()
    d["p"] = OsSystem(marker)
    path = npy_with_pickle(tmp_path / "evil.npy", d, 3)
    with pytest.raises(InputError):  # p is os.system's return value, not an array of 0/1
        read_events(path, trust_pickle=True)
    assert marker.exists()


def test_cli_refuses_the_payload_under_every_command(tmp_path, capsys):
    marker = tmp_path / "marker"
    d = events_dict()
    d["t"] = OsSystem(marker)
    evil = npy_with_pickle(tmp_path / "evil.npy", d, 3)
    argvs = [
        ["render", "--events", str(evil), "--out", str(tmp_path / "png")],
        ["make-dataset", "--events", str(evil), "--out", str(tmp_path / "ds"), "--no-video"],
        ["convert", str(evil), "--out", str(tmp_path / "conv")],
        ["run", "--events", str(evil), "--out", str(tmp_path / "run"), "--output-len", "fixed:2", "--no-ceilings", "--warmup", "0"],
        ["verify", "--events", str(evil), "--max-new-tokens", "2"],
    ]
    for argv in argvs:
        main(argv)
        assert not marker.exists(), argv
    err = capsys.readouterr().err
    assert "--trust-pickle" in err


def test_convert_writes_safe_files_that_read_back(tmp_path, capsys):
    d = events_dict()
    src = npy_with_pickle(tmp_path / "s.npy", d, 3)
    for fmt in ("h5", "npz"):
        assert main(["convert", str(src), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
        out = tmp_path / fmt / f"s.{fmt}"
        np.testing.assert_array_equal(read_events(out).events, read_events(src).events)


def test_unpickler_never_imports_what_it_refuses(monkeypatch):
    # find_class decides on the names alone: a refused module is never imported.
    imported = []
    real_import = builtins.__import__

    def spy(name, *a, **k):
        imported.append(name)
        return real_import(name, *a, **k)

    data = pickle.dumps(OsSystem("/nonexistent/marker"))
    monkeypatch.setattr(builtins, "__import__", spy)
    with pytest.raises(InputError):
        SafeUnpickler(io.BytesIO(data), "f").load()
    assert "posix" not in imported and "os" not in imported

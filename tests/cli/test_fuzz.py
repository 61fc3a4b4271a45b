"""Property-based tests of bad input, broadly (SPEC §7): random and corrupted files and option values.

Every case must end with a documented exit code (0, 2 usage, 3 bad input, 4 out of memory; never 1; a corrupt or
malformed input file 0 or 3), print one `error: …` line on stderr (or Typer's usage block for exit 2) and no warning,
and, when it fails, leave its folder as it was: no run file, no `.partial*` or `.lock` file, no file changed; a run
that succeeds writes finite numbers. The CLI runs in-process (`CliRunner`) on a few rows and the 6→8→8→3 test MLP,
so a case costs tens of milliseconds. `test_edge_cases` pins the cases that the random ones once found failing.
The suite runs them from a fixed seed (`--hypothesis-seed=0` in pytest's options, so CI is repeatable); explore
others with `pytest tests/cli/test_fuzz.py --hypothesis-seed=N`.
"""

from __future__ import annotations

import json
import string
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from ntk_explain.cli import app
from ntk_explain.errors import BadInputError, UsageError
from ntk_explain.loading.data import DATA_FORMATS, load_dataset
from ntk_explain.loading.models import load_model
from ntk_explain.options import FEATURE_DTYPES, KERNELS, PROJECTIONS
from tests.models import mlp
from tests.processes import CLASSES, mlp_data, trained_mlp, write_arrays

MODEL = "tests.models:mlp"  # 6 features, 3 classes
FEATURES, N_TRAIN, N_TEST = 6, 6, 3
RUNNER = CliRunner()
FUZZ = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}
# Python shows these only to developers (`python -W`); any other warning is one more line on a user's stderr.
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
CORRUPTIONS = ("truncate", "flip", "append", "random", "empty")


# --------------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as name:
        yield Path(name)


def _snapshot(where: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in where.iterdir() if p.is_file()}


def run_cli(
    where: Path, *args: str, codes: tuple[int, ...] = (0, 2, 3, 4), creates: str | None = None, finite: bool = True
) -> int:
    """Run `ntk-explain ARGS` in-process on the files of `where` and check SPEC §7's contract; the exit code.

    `creates`: the one file a successful run adds (a failing one adds or changes nothing), with only finite numbers
    when `finite`."""
    before = _snapshot(where)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in HIDDEN_WARNINGS:
            warnings.simplefilter("ignore", category)
        result = RUNNER.invoke(app, list(args))
    code, stderr = result.exit_code, result.stderr
    if currently_in_test_context():
        event(f"exit {code}")  # the exit-code table: pytest --hypothesis-show-statistics
    assert result.exc_info is None or issubclass(result.exc_info[0], SystemExit), "".join(
        traceback.format_exception(*result.exc_info)
    )
    assert code in codes, f"exit {code} (expected one of {codes}) for {args}: {stderr}"
    assert "Traceback" not in stderr
    lines = [*stderr.splitlines(), *(f"{w.category.__name__}: {w.message}" for w in caught)]
    if code == 0:
        assert not lines, lines
    elif not (code == 2 and stderr.startswith("Usage: ") and "Error" in stderr):  # Typer's usage block
        assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0] != "error: ", lines
    after = _snapshot(where)
    new = set(after) - set(before)  # no run file when failing, and never a .partial* or .lock file
    assert new == ({creates} if code == 0 and creates else set()), sorted(new)
    if code:
        assert after == before, [name for name in before if after.get(name) != before[name]]
    elif creates:
        with h5py.File(where / creates, "r") as f:
            f.visititems(_assert_finite if finite else lambda name, obj: None)
    return code


def _assert_finite(name: str, obj: h5py.Group | h5py.Dataset) -> None:
    if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
        assert np.isfinite(obj[()]).all(), f"non-finite values in /{name}"


def _state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in trained_mlp().state_dict().items()}


def _write_state(path: Path, state: dict) -> None:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)


@cache
def valid_bytes(name: str) -> bytes:
    """The bytes of a valid input file: train/test data (.npz, .h5, .safetensors), weights or an exported model."""
    with folder() as where:
        path = where / name
        if path.stem in ("train", "test"):
            x, y = mlp_data(np.random.default_rng(len(path.stem)), N_TRAIN if path.stem == "train" else N_TEST)
            write_arrays(path, x=x, y=y)
        elif path.stem == "w":
            _write_state(path, _state())
        else:
            batch = torch.export.Dim("batch", min=1)
            example = (torch.zeros(2, FEATURES, dtype=torch.float64),)
            torch.export.save(torch.export.export(mlp(), example, dynamic_shapes=({0: batch},)), path)
        return path.read_bytes()


def _valid_inputs(where: Path) -> None:
    for name in ("train.npz", "test.npz"):
        (where / name).write_bytes(valid_bytes(name))


def base_args(where: Path, **files: str) -> list[str]:
    """`compute` of the valid inputs of `where` into run.h5; `files` replace or add file options."""
    options = {"model": MODEL, "train": "train.npz", "test": "test.npz", **files}
    args = ["compute", "--out", str(where / "run.h5"), "--device", "cpu", "--quiet"]
    for option, name in options.items():
        args += [f"--{option}", name if option == "model" and not name.endswith(".pt2") else str(where / name)]
    return args


@st.composite
def corrupted(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` truncated, with flipped bytes, with garbage appended, replaced by random bytes, or empty."""
    how = draw(st.sampled_from(CORRUPTIONS))
    if how == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if how == "flip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "append":
        return valid + draw(st.binary(min_size=1, max_size=512))
    return draw(st.binary(min_size=1, max_size=2048)) if how == "random" else b""


# --------------------------------------------------------------------------------------------------
# (a) Corrupted bytes of every input format

CORRUPTIBLE = {  # file name -> the compute option that reads it
    **{f"{split}{suffix}": split for split in ("train", "test") for suffix in (".npz", ".h5", ".safetensors")},
    **{f"w{suffix}": "weights" for suffix in (".safetensors", ".pt", ".pth")},
    "m.pt2": "model",
}


@settings(max_examples=70, **FUZZ)
@given(st.sampled_from(sorted(CORRUPTIBLE)), st.data())
def test_corrupted_input_files(name: str, data: st.DataObject) -> None:
    with folder() as where:
        _valid_inputs(where)
        (where / name).write_bytes(data.draw(corrupted(valid_bytes(name)), label="bytes"))
        run_cli(where, *base_args(where, **{CORRUPTIBLE[name]: name}), codes=(0, 3), creates="run.h5")


# --------------------------------------------------------------------------------------------------
# (b) Well-formed files of the wrong structure: keys, shapes, dtypes, values

DTYPES = {
    ".npz": ("float16", "float32", "float64", "int8", "int64", "uint8", "bool", "complex64", "U2", "object"),
    ".h5": ("float16", "float32", "float64", "int8", "int64", "uint8", "bool", "complex64", "S2"),
    ".safetensors": ("float16", "float32", "float64", "int8", "int64", "uint8", "bool"),
}
TAILS = ((2, 3), (1, FEATURES), (5,), (FEATURES, 0), (0,), ())
EXTREMES = (-1.0, 0.5, 1e30, -1e300, np.nan, np.inf, -np.inf)


def _mostly(valid: object, *others: object) -> st.SearchStrategy:
    """`valid` three times out of four, else one of `others`: most cases then have one defect, not several."""
    return st.sampled_from((valid,) * 3 * len(others) + others)


def _elements(dtype: np.dtype, labels: bool, clean: bool) -> st.SearchStrategy:
    """Array values: clean (labels in range, features in [-3, 3]), or anything of a bool, complex or string dtype;
    otherwise integers, or floats from a few extremes (NaN, ±inf, non-integers, too large) and, for features, any finite
    value (large ones overflow the float32 kernel)."""
    if dtype.kind == "O":
        return st.one_of(st.integers(-1, CLASSES), st.text(max_size=2), st.none())
    if dtype.kind not in "iuf":
        return hnp.from_dtype(dtype)
    if clean:
        return st.integers(0, CLASSES - 1) if labels or dtype.kind != "f" else st.floats(-3, 3, width=16).map(float)
    if dtype.kind != "f":
        return hnp.from_dtype(dtype)
    largest = float(np.finfo(dtype).max)
    extremes = [v for v in EXTREMES if not np.isfinite(v) or abs(v) <= largest]
    return st.sampled_from(extremes) | (st.integers(-1, CLASSES) if labels else st.floats(-largest, largest))


@st.composite
def malformed_data(draw: st.DrawFn, suffix: str) -> dict[str, np.ndarray]:
    """Arrays x, y of mostly valid, sometimes wrong dtypes, shapes, values and names; maybe an extra array."""
    rows = draw(_mostly(N_TEST, 0, 1))
    x_dtype = np.dtype(draw(_mostly("float32", *DTYPES[suffix])))
    y_dtype = np.dtype(draw(_mostly("int64", *DTYPES[suffix])))
    x_shape = draw(_mostly((rows, FEATURES), *((rows, *tail) for tail in TAILS), ()))
    y_shape = draw(_mostly((rows,), (rows + 1,), (max(rows - 1, 0),), (rows, 1), ()))
    arrays = {
        "x": draw(hnp.arrays(x_dtype, x_shape, elements=_elements(x_dtype, False, draw(_mostly(True, False))))),
        "y": draw(hnp.arrays(y_dtype, y_shape, elements=_elements(y_dtype, True, draw(_mostly(True, False))))),
    }
    renamed = draw(_mostly({}, {"x": "X"}, {"y": "labels"}, {"x": "features", "y": "targets"}))
    named = {renamed.get(key, key): value for key, value in arrays.items()}
    if draw(st.booleans()):
        named["extra"] = np.zeros(2)
    return named


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if path.suffix == ".npz":
        np.savez(path, **arrays)  # object arrays are pickled; the loader must refuse them
    elif path.suffix == ".h5":
        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                f[key] = value.astype(h5py.string_dtype()) if value.dtype.kind == "U" else value
    else:
        write_arrays(path, **{key: np.ascontiguousarray(value) for key, value in arrays.items()})


@settings(max_examples=60, **FUZZ)
@given(st.sampled_from(sorted(DTYPES)), st.sampled_from(["train", "test"]), st.data())
def test_malformed_data_files(suffix: str, split: str, data: st.DataObject) -> None:
    with folder() as where:
        _valid_inputs(where)
        _save(where / f"bad{suffix}", data.draw(malformed_data(suffix), label="arrays"))
        run_cli(where, *base_args(where, **{split: f"bad{suffix}"}), codes=(0, 3), creates="run.h5")


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.uint8, torch.bool, torch.complex64)
EDITS = ("drop", "extra", "rename", "reshape", "dtype", "nonfinite", "scalar")
PICKLED_EDITS = ("non_tensor", "int_key")


@st.composite
def malformed_state(draw: st.DrawFn, suffix: str) -> dict:
    """The trained MLP's state dict with random edits (keys dropped, added, renamed; tensors reshaped, retyped,
    non-finite; in pickled files non-tensors and non-string keys), then maybe emptied (or, pickled, nested)."""
    pickled = suffix != ".safetensors"
    state: dict = _state()
    for edit in draw(st.lists(st.sampled_from(EDITS + PICKLED_EDITS * pickled), max_size=3)):
        key = draw(st.sampled_from(sorted(k for k in state if isinstance(k, str))))
        value = state[key]
        if edit == "drop":
            del state[key]
        elif edit == "extra":
            state["9.weight"] = torch.zeros(2, 2)
        elif edit == "rename":
            state[f"model.{key}"] = state.pop(key)
        elif edit == "reshape":
            state[key] = torch.zeros(draw(st.lists(st.integers(0, 9), max_size=3)), dtype=torch.float64)
        elif edit == "dtype" and isinstance(value, torch.Tensor):
            state[key] = value.to(draw(st.sampled_from(WEIGHT_DTYPES)))
        elif edit == "nonfinite" and isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            state[key] = value.clone()
            state[key].view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(st.sampled_from(EXTREMES[-3:]))
        elif edit == "scalar":
            state[key] = torch.tensor(1.0)
        elif edit == "non_tensor":
            state[key] = draw(st.one_of(st.integers(), st.text(max_size=3), st.lists(st.floats(), max_size=2)))
        elif edit == "int_key":
            state[draw(st.integers(0, 9))] = torch.zeros(1)
    container = draw(st.sampled_from(("plain", "empty", *(("wrapped", "nested") if pickled else ()))))
    return {"plain": state, "wrapped": {"state_dict": state}, "empty": {}, "nested": {"model": state}}[container]


@settings(max_examples=40, **FUZZ)
@given(st.sampled_from([".safetensors", ".pt", ".pth"]), st.data())
def test_malformed_weight_files(suffix: str, data: st.DataObject) -> None:
    with folder() as where:
        _valid_inputs(where)
        _write_state(where / f"w{suffix}", data.draw(malformed_state(suffix), label="state"))
        run_cli(where, *base_args(where, weights=f"w{suffix}"), codes=(0, 3), creates="run.h5")


# --------------------------------------------------------------------------------------------------
# (c) Random option values

WORDS = st.text(max_size=8)  # any characters: NUL, "-", ",", non-ASCII digits, ...


def _option(valid: st.SearchStrategy[str], invalid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value three times out of four: a case then mostly has one bad option, not several."""
    return _mostly(True, False).flatmap(lambda ok: valid if ok else invalid)


def _ints(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def _list(valid: tuple[str, ...], invalid: tuple[str, ...]) -> st.SearchStrategy[str]:
    return _option(
        st.lists(st.sampled_from(valid), min_size=1, max_size=3).map(",".join),
        st.lists(st.sampled_from(valid + invalid), min_size=1, max_size=3).map(",".join) | WORDS,
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 64) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
MODEL_SPECS = ("zoo:mlp", "zoo:cnn", "zoo:", "tests.models:cnn", "tests.models:MODELS", "tests.models:Twice")
MODEL_SPECS += ("tests.models", "tests.models:", ":mlp", "no_such_module_xyz:mlp", "absent.pt2", "train.npz", "")
OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--batch-size": _option(_ints(1, 10**6) | st.just("auto"), _ints(-2, 0) | WORDS),
    "--proj-dim": _option(_ints(1, 2048), _ints(-2, 0) | WORDS),
    "--max-memory": _option(
        st.builds(
            "{}{}".format,
            st.sampled_from(["1", "4096", "1.5", ".5", "99999999999999999999"]),
            st.sampled_from(["", "B", " KB", "kib", "MB", "MiB", "GB", "TiB"]),
        ),
        st.sampled_from(["0", "-1GB", "1e3", "12 parsecs", "5%", "GB", ""]) | WORDS,
    ),
    "--kernel": _list(KERNELS, ("bogus", "", " trace")),
    "--projection": _option(st.sampled_from(PROJECTIONS), st.just("bogus") | WORDS),
    "--feature-dtype": _option(st.sampled_from(FEATURE_DTYPES), st.sampled_from(("float64", "int8")) | WORDS),
    "--n-train": _option(_ints(1, 20), _ints(-2, 0) | WORDS),
    "--n-test": _option(_ints(1, 20), _ints(-2, 0) | WORDS),
    "--model-kwargs": _option(
        st.fixed_dictionaries({}, optional={"classes": st.integers(1, 64)}).map(json.dumps),
        st.fixed_dictionaries({"classes": st.integers(-2, 0) | JSON}).map(json.dumps) | JSON.map(json.dumps) | WORDS,
    ),
    "--device": _option(
        st.sampled_from(["auto", "cpu", "cpu:0"]),
        st.sampled_from(["cuda", "cuda:7", "cuda:-1", "meta", "mps", "", "CPU"]) | WORDS,
    ),
    "--dtype": _option(st.sampled_from(["float32", "float64"]), st.sampled_from(["float16", "int64"]) | WORDS),
    "--params": _list(("*", "1.*", "*.weight", "5.bias", "**", "?.bias"), ("nomatch.*", "[", "")),
    "--seed": _option(_ints(0, 2**63 - 1), _ints(-(2**70), -1) | _ints(2**63, 2**70) | WORDS),
    "--x-key": _option(st.just("x"), st.sampled_from(["y", "X", ""]) | WORDS),
    "--y-key": _option(st.just("y"), st.sampled_from(["x", "Y", ""]) | WORDS),
    "--model": _option(st.sampled_from([MODEL, "tests.models:twice"]), st.sampled_from(MODEL_SPECS) | WORDS),
    "--out": _option(  # in the case's folder
        st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12).filter(lambda n: n.strip(".")),
        st.sampled_from(["", ".", "sub/run.h5", "train.npz", "run.h5/", "o" * 240, "o" * 300])
        | WORDS.filter(lambda n: "/" not in n),
    ),
}


@settings(max_examples=70, **FUZZ)
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), min_size=1, max_size=4), st.data())
def test_random_option_values(chosen: dict[str, None], data: st.DataObject) -> None:
    with folder() as where:
        _valid_inputs(where)
        args, out = base_args(where), "run.h5"
        for option in chosen:
            value = data.draw(OPTIONS[option], label=option)
            if option == "--out":
                value, out = str(where / value), Path(value).name
            args += [f"{option}={value}"]
        run_cli(where, *args, creates=out)


# --------------------------------------------------------------------------------------------------
# Run files for attribute, evaluate and info: corrupted bytes or edited structure


@cache
def run_file() -> tuple[bytes, tuple[str, ...], tuple[str, ...]]:
    """A valid run file with a plain, a projected kernel and an attribution; its objects, and its attributes as
    `object path:name`."""
    with folder() as where:
        _valid_inputs(where)
        kernels = ["--kernel", "trace,pseudo", "--projection", "sparse", "--proj-dim", "4"]
        assert run_cli(where, *base_args(where), "--kernel", "trace,pseudo", creates="run.h5") == 0
        assert run_cli(where, *base_args(where), *kernels, "--out", str(where / "sparse.h5"), creates="sparse.h5") == 0
        with h5py.File(where / "run.h5", "a") as f, h5py.File(where / "sparse.h5", "r") as g:
            g.copy("kernel/pseudo-sparse-4", f["kernel"])
        assert run_cli(where, "attribute", str(where / "run.h5"), "--device", "cpu", "--quiet") == 0
        with h5py.File(where / "run.h5", "r") as f:
            objects = ["/"]
            f.visit(lambda name: objects.append(name))
            attributes = tuple(f"{name}:{key}" for name in objects for key in f[name].attrs)
        return (where / "run.h5").read_bytes(), tuple(objects), attributes


ATTR_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=6), st.booleans(), st.just(np.zeros(2))
)


@st.composite
def edited_run(draw: st.DrawFn, path: Path) -> None:
    """Edit the valid run file at `path` in place: drop objects or attributes, change attribute values,
    or replace a dataset by a random array."""
    _, objects, attributes = run_file()
    with h5py.File(path, "r+") as f:
        for _ in range(draw(st.integers(1, 3))):
            edit = draw(st.sampled_from(["drop_attr", "set_attr", "replace", "drop"]))
            name = draw(st.sampled_from([name for name in objects if name == "/" or name in f]))
            if edit == "drop" and name != "/":
                del f[name]
            elif edit in ("drop_attr", "set_attr"):
                keys = [a.rpartition(":")[2] for a in attributes if a.startswith(f"{name}:")]
                key = draw(st.sampled_from([*keys, "complete", "format", "format_version"]))
                if edit == "set_attr":
                    f[name].attrs[key] = draw(ATTR_VALUES)
                else:
                    f[name].attrs.pop(key, None)
            elif edit == "replace" and isinstance(f[name], h5py.Dataset):
                dtype = draw(st.sampled_from(["float32", "float64", "int64", "uint8", "bool"]))
                shape = draw(st.lists(st.integers(0, 7), max_size=3))
                del f[name]
                f[name] = draw(hnp.arrays(dtype, tuple(shape)))


COMMANDS = (
    ("info",),
    ("info", "--json"),
    ("evaluate",),
    ("evaluate", "--json"),
    ("attribute", "--overwrite"),
    ("attribute", "--overwrite", "--kernel", "pseudo-sparse-4"),
    ("attribute", "--overwrite", "--surrogate", "ridge", "--normalize", "scale"),
    ("attribute", "--overwrite", "--max-memory", "100"),
)


@settings(max_examples=60, **FUZZ)
@given(st.sampled_from(COMMANDS), st.booleans(), st.data())
def test_damaged_run_files(command: tuple[str, ...], structural: bool, data: st.DataObject) -> None:
    """info, evaluate and attribute on damaged run files: dropped objects and attributes, edited values, flipped bytes.
    attribute reads kernels past what opening a run file checks."""
    valid, attribute = run_file()[0], command[0] == "attribute"
    with folder() as where:
        run = where / "run.h5"
        if structural:
            run.write_bytes(valid)
            data.draw(edited_run(run), label="edits")
        else:
            run.write_bytes(data.draw(corrupted(valid), label="bytes"))
        options = ("--device", "cpu", "--quiet") if attribute else ()
        run_cli(where, command[0], str(run), *command[1:], *options)


@settings(max_examples=30, **FUZZ)
@given(
    st.sampled_from(["info", "evaluate", "attribute"]),
    st.sampled_from(["", ".", "missing.h5", "train.npz", "sub", "o" * 300]) | WORDS.filter(lambda n: "/" not in n),
)
def test_run_file_paths(command: str, name: str) -> None:
    """No run file at all: a missing file, a directory, another format, a name too long or with odd characters."""
    with folder() as where:
        _valid_inputs(where)
        (where / "sub").mkdir()
        run_cli(where, command, str(where / name), codes=(2, 3))


# --------------------------------------------------------------------------------------------------
# The loaders themselves: random specs, array names and row limits


PATHS = st.one_of(
    st.sampled_from(["train.npz", "train.h5", "train.safetensors", "zoo:digits", "zoo:digits:test", ".", "", "a.npz"]),
    st.builds("zoo:digits:{}".format, WORDS),
    st.builds("{}{}".format, WORDS, st.sampled_from(DATA_FORMATS)),
    st.builds("{}.npz".format, st.text(string.ascii_letters, min_size=250, max_size=300)),
)


@settings(max_examples=40, **FUZZ)
@given(PATHS, st.sampled_from(["x", "y", "X", ""]) | WORDS, st.sampled_from(["y", "x"]) | WORDS, st.data())
def test_load_dataset_returns_or_refuses(spec: str, x_key: str, y_key: str, data: st.DataObject) -> None:
    limit = data.draw(st.none() | st.integers(-2, 10), label="limit")
    with folder() as where:
        for name in ("train.npz", "train.h5", "train.safetensors"):
            (where / name).write_bytes(valid_bytes(name))
        path = spec if spec.startswith("zoo:") else str(where / spec)
        try:
            dataset = load_dataset(path, "train", x_key=x_key, y_key=y_key, limit=limit)
        except (BadInputError, UsageError) as error:
            assert len(str(error).splitlines()) == 1 and str(error).strip(), str(error)
        else:
            assert len(dataset.x) == len(dataset.y) == len(dataset.index) >= 1
            assert torch.isfinite(dataset.x).all() and (dataset.y >= 0).all()


@settings(max_examples=20, **FUZZ)
@given(st.sampled_from(["w.safetensors", "w.pt", "m.pt2"]), st.data())
def test_load_model_returns_or_refuses(name: str, data: st.DataObject) -> None:
    with folder() as where:
        (where / name).write_bytes(data.draw(corrupted(valid_bytes(name)), label="bytes"))
        spec, weights = (str(where / name), None) if name.endswith(".pt2") else (MODEL, str(where / name))
        try:
            loaded = load_model(spec, weights=weights)
        except BadInputError as error:
            assert len(str(error).splitlines()) == 1 and str(error).strip(), str(error)
        else:
            assert all(torch.isfinite(t).all() for t in loaded.module.state_dict().values() if t.is_floating_point())


# --------------------------------------------------------------------------------------------------
# Cases the random ones once found failing: huge finite values, damaged kernels, extreme option values


def _huge_inputs(where: Path) -> list[str]:
    np.savez(where / "train.npz", x=np.full((N_TRAIN, FEATURES), 1e30, np.float32), y=np.zeros(N_TRAIN, np.int64))
    return base_args(where)


def _long_double_inputs(where: Path) -> list[str]:
    """An .h5 data set of float128 (a flipped byte of a float64 one's type made it so): torch has no such dtype."""
    rng = np.random.default_rng(0)
    with h5py.File(where / "test.h5", "w") as f:
        f["x"] = rng.normal(size=(N_TEST, FEATURES)).astype(np.longdouble)
        f["y"] = np.zeros(N_TEST, np.longdouble)
    return base_args(where, test="test.h5")


def _huge_weights(where: Path) -> list[str]:
    state = _state()
    state["5.weight"][0, 0] = 1e25
    _write_state(where / "w.pt", state)
    return base_args(where, weights="w.pt")


def _attribute_damaged(damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(where: Path) -> list[str]:
        (where / "run.h5").write_bytes(run_file()[0])
        damage(where / "run.h5")
        return ["attribute", str(where / "run.h5"), "--overwrite", "--device", "cpu", "--quiet"]

    return setup


def _drop_diag_test(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["kernel/trace/diag_test"]


def _corrupt_chunk(path: Path) -> None:
    with h5py.File(path, "r") as f:
        chunk = f["kernel/trace/train_train"].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = bytes(chunk.size)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        pytest.param(lambda w: [*base_args(w), f"--out={w / ('o' * 300)}"], 3, id="out_too_long"),
        pytest.param(lambda w: [*base_args(w), "--batch-size=²"], 2, id="superscript_batch_size"),
        pytest.param(lambda w: [*base_args(w), "--seed=8589934592", "--projection=gaussian"], 0, id="seed_2**33"),
        pytest.param(lambda w: [*base_args(w), "--seed=18446744073709551616"], 2, id="seed_2**64"),
        pytest.param(_huge_inputs, 3, id="huge_inputs"),
        pytest.param(_huge_weights, 3, id="huge_weights"),
        pytest.param(_long_double_inputs, 0, id="long_double_inputs"),
        pytest.param(_attribute_damaged(_drop_diag_test), 3, id="attribute_missing"),
        pytest.param(_attribute_damaged(_corrupt_chunk), 3, id="attribute_bad_chunk"),
    ],
)
def test_edge_cases(setup: Callable[[Path], list[str]], code: int) -> None:
    """Cases the random ones found once (exit 1, a NaN kernel with exit 0), each with the exit code it has now."""
    with folder() as where:
        _valid_inputs(where)
        args = setup(where)
        assert run_cli(where, *args, creates="run.h5" if args[0] == "compute" else None) == code

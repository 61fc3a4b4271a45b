"""Tests of the HDF5 run file: provenance, atomic writes, datasets, validation, normalisation, info."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

from ntk_explain import __version__, store
from ntk_explain.cli.render import info_table
from ntk_explain.errors import BadInputError
from ntk_explain.kernel.read import read_kernel

ROOT_KEYS = {
    "format",
    "format_version",
    "ntk_explain_version",
    "torch_version",
    "numpy_version",
    "h5py_version",
    "hdf5_version",
    "command",
    "params",
    "created",
    "host",
    "device",
    "model_sha256",
    "weights_sha256",
    "data_sha256",
    "seed",
}


def _attrs(**params) -> dict:
    return store.provenance(
        ["ntk-explain", "compute", "--kernel", "trace"],
        params or {"kernel": "trace", "proj_dim": 128, "params": ["fc.*"]},
        device="cpu",
        seed=7,
        model_sha256="ab" * 32,
        weights_sha256=None,
        data_sha256={"train": "cd" * 32, "test": "ef" * 32},
    )


def _make_run(path: Path) -> Path:
    with store.create_run(path, overwrite=False, attrs=_attrs()) as f:
        store.write_array(f.create_group("data/train"), "labels", np.arange(5), ("train",))
    return path


def _dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_root_attrs_complete_and_parseable(tmp_path):
    path = _make_run(tmp_path / "run.h5")
    attrs = store.root_attrs(path)
    assert set(attrs) == ROOT_KEYS | {"complete"}
    assert attrs["complete"] is True or attrs["complete"] == 1
    assert attrs["format"] == "ntk-explain"
    assert attrs["format_version"] == store.FORMAT_VERSION
    assert attrs["ntk_explain_version"] == __version__
    assert attrs["hdf5_version"] == h5py.version.hdf5_version
    assert attrs["torch_version"]  # torch is installed
    created = datetime.fromisoformat(attrs["created"])
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=5)
    assert json.loads(attrs["params"]) == {"kernel": "trace", "proj_dim": 128, "params": ["fc.*"]}
    assert json.loads(attrs["command"]) == ["ntk-explain", "compute", "--kernel", "trace"]
    assert json.loads(attrs["data_sha256"]) == {"train": "cd" * 32, "test": "ef" * 32}
    assert attrs["weights_sha256"] == ""
    assert attrs["seed"] == 7
    assert attrs["device"] == "cpu"


def test_existing_file_refused_and_untouched(tmp_path):
    path = _make_run(tmp_path / "run.h5")
    before = path.read_bytes()
    with (
        pytest.raises(BadInputError, match="exists; pass --overwrite to replace it"),
        store.create_run(path, overwrite=False, attrs=_attrs()),
    ):
        pytest.fail("body must not run")
    assert path.read_bytes() == before
    assert _dir_listing(tmp_path) == ["run.h5"]


def test_overwrite_replaces(tmp_path):
    path = _make_run(tmp_path / "run.h5")
    with store.create_run(path, overwrite=True, attrs=_attrs()) as f:
        store.write_array(f, "new", np.ones(3), ("x",))
    with store.open_run(path) as f:
        assert "new" in f and "data" not in f
    assert _dir_listing(tmp_path) == ["run.h5"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_create_run_failure_leaves_nothing(tmp_path, exc):
    path = tmp_path / "run.h5"
    with pytest.raises(exc), store.create_run(path, overwrite=False, attrs=_attrs()) as f:
        store.write_array(f, "x", np.ones((4, 4)), ("a", "b"))
        raise exc("boom")
    assert _dir_listing(tmp_path) == []


def test_create_run_failure_with_overwrite_keeps_original(tmp_path):
    path = _make_run(tmp_path / "run.h5")
    before = path.read_bytes()
    with pytest.raises(RuntimeError), store.create_run(path, overwrite=True, attrs=_attrs()):
        raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert _dir_listing(tmp_path) == ["run.h5"]


def test_update_run_adds_groups(tmp_path):
    path = _make_run(tmp_path / "run.h5")
    with store.update_run(path) as (f, _):
        store.write_array(f.create_group("surrogate"), "b", np.zeros(3), ("class",))
    with store.open_run(path) as f:
        assert "surrogate/b" in f and "data/train/labels" in f
    assert _dir_listing(tmp_path) == ["run.h5"]


def test_a_second_writer_is_refused(tmp_path):
    """While one writer holds run.h5, another (update or overwrite) is refused with bad input; the file is untouched
    and the lock is gone once the first is done."""
    path = _make_run(tmp_path / "run.h5")
    before = path.read_bytes()
    with store.update_run(path) as (f, _):
        store.write_array(f.create_group("surrogate"), "b", np.zeros(3), ("class",))
        with pytest.raises(BadInputError, match="another process"), store.update_run(path):
            pass
        with pytest.raises(BadInputError, match="another process"), store.create_run(path, overwrite=True, attrs={}):
            pass
        assert path.read_bytes() == before
    assert _dir_listing(tmp_path) == ["run.h5"]
    with store.open_run(path) as f:
        assert "surrogate/b" in f


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_update_run_failure_keeps_original(tmp_path, exc):
    path = _make_run(tmp_path / "run.h5")
    before = path.read_bytes()
    with pytest.raises(exc), store.update_run(path) as (f, _):
        store.write_array(f.create_group("surrogate"), "b", np.zeros(3), ("class",))
        del f["data"]
        raise exc("boom")
    assert path.read_bytes() == before
    assert _dir_listing(tmp_path) == ["run.h5"]


def test_an_interrupted_update_with_a_request_is_kept_and_resumed_by_it_alone(tmp_path):
    """The copy of a resumable update survives an interrupt (complete=False), and only the same request on the same
    file reopens it: not another request, not a compute's resume, not after the run file changed."""
    path = _make_run(tmp_path / "run.h5")
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt), store.update_run(path, request={"a": 1}) as (f, resumed):
        assert not resumed
        store.write_array(f.create_group("surrogate"), "b", np.arange(3.0), ("class",))
        raise KeyboardInterrupt
    partial = store.partial_path(path)
    kept = partial.read_bytes()
    with h5py.File(partial, "r") as f:
        assert not f.attrs["complete"] and "surrogate/b" in f
    assert path.read_bytes() == before
    with (
        pytest.raises(BadInputError, match="answers other options"),
        store.update_run(path, request={"a": 2}, resume=True),
    ):
        pass
    with (
        pytest.raises(BadInputError, match="interrupted update"),
        store.create_run(path, overwrite=True, attrs=_attrs(), resumable=True, resume=True),
    ):
        pass
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # as if the run file were rewritten
    with pytest.raises(BadInputError, match="earlier run file"), store.update_run(path, request={"a": 1}, resume=True):
        pass
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert partial.read_bytes() == kept
    with store.update_run(path, request={"a": 1}, resume=True) as (f, resumed):
        assert resumed and f["surrogate/b"][()].tolist() == [0.0, 1.0, 2.0]
    with store.open_run(path) as f:
        assert f.attrs["complete"] and "update" not in f.attrs and "surrogate/b" in f
    assert _dir_listing(tmp_path) == ["run.h5"]


def test_an_update_does_not_replace_an_interrupted_compute(tmp_path):
    """compute --overwrite of an existing run, interrupted, keeps its partial file: attribute on the old run file is
    refused rather than copying over it."""
    path = _make_run(tmp_path / "run.h5")
    with pytest.raises(KeyboardInterrupt), store.create_run(path, overwrite=True, attrs=_attrs(), resumable=True):
        raise KeyboardInterrupt
    kept = store.partial_path(path).read_bytes()
    with pytest.raises(BadInputError, match="interrupted compute"), store.update_run(path, request={"a": 1}):
        pass
    assert store.partial_path(path).read_bytes() == kept


def test_datasets_chunked_compressed_with_dims(tmp_path):
    path = tmp_path / "run.h5"
    with store.create_run(path, overwrite=False, attrs=_attrs()) as f:
        g = f.create_group("kernel/full")
        store.write_array(g, "test_train", np.ones((3, 5, 2, 2), np.float32), ("test", "train", "class", "class"))
        store.create_rows(g, "train_train", (3000, 1000), np.float64, ("train", "train"))
        store.create_rows(g, "wide", (4, 300_000), np.float32, ("train", "train"))
        store.create_rows(g, "empty", (0, 7), np.float32, ("train", "feature"))
    with store.open_run(path) as f:
        for name, ds in f["kernel/full"].items():
            assert ds.chunks is not None, name
            assert ds.compression == "gzip" and ds.compression_opts == 4, name
            assert ds.shuffle, name
        g = f["kernel/full"]
        assert list(g["test_train"].attrs["dims"]) == ["test", "train", "class", "class"]
        assert list(g["train_train"].attrs["dims"]) == ["train", "train"]
        # rows of whole trailing axes, ~1 MiB per chunk, at least one row
        assert g["train_train"].chunks == (131, 1000)
        assert g["test_train"].chunks == (3, 5, 2, 2)
        # a row over 1 MiB is split along its next axis
        assert g["wide"].chunks == (1, 262144)
        assert g["empty"].shape == (0, 7)


def test_create_rows_rejects_mismatched_dims(tmp_path):
    with (
        pytest.raises(ValueError, match="dims"),
        store.create_run(tmp_path / "run.h5", overwrite=False, attrs=_attrs()) as f,
    ):
        store.create_rows(f, "x", (3, 4), np.float32, ("train",))
    assert _dir_listing(tmp_path) == []


def test_tile_writes_read_back(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.standard_normal((37, 23, 3)).astype(np.float32)
    path = tmp_path / "run.h5"
    with store.create_run(path, overwrite=False, attrs=_attrs()) as f:
        ds = store.create_rows(f, "k", full.shape, np.float32, ("test", "train", "class"), tile=8)
        assert ds.chunks == (8, 23, 3)
        for r0 in range(0, 37, 10):
            for c0 in range(0, 23, 6):
                ds[r0 : r0 + 10, c0 : c0 + 6] = full[r0 : r0 + 10, c0 : c0 + 6]
    with store.open_run(path) as f:
        np.testing.assert_array_equal(f["k"][()], full)


def _kernel_file(tmp_path: Path, name: str, train_train, test_train, diag_train, diag_test) -> Path:
    path = tmp_path / "run.h5"
    with store.create_run(path, overwrite=False, attrs=_attrs()) as f:
        g = f.create_group(f"kernel/{name}")
        store.set_attrs(g, {"kernel": name, "projection": "none", "proj_dim": 0, "complete": True})
        classes = ("class",) * (train_train.ndim - 2)
        store.write_array(g, "train_train", train_train, ("train", "train", *classes))
        store.write_array(g, "test_train", test_train, ("test", "train", *classes))
        store.write_array(g, "diag_train", diag_train, ("train", *(("class",) * (diag_train.ndim - 1))))
        store.write_array(g, "diag_test", diag_test, ("test", *(("class",) * (diag_test.ndim - 1))))
    return path


def _features(rng, n, c, p=11):
    g = rng.standard_normal((n, c, p))
    g[1] = 0.0  # a point with a zero gradient: its self-kernel is 0
    return g


@pytest.mark.parametrize("block", ["train_train", "test_train"])
def test_cosine_trace(tmp_path, block):
    rng = np.random.default_rng(1)
    gtr, gte = _features(rng, 6, 3), _features(rng, 4, 3)
    k = lambda a, b: np.einsum("ncp,mcp->nm", a, b)  # noqa: E731
    path = _kernel_file(tmp_path, "trace", k(gtr, gtr), k(gte, gtr), np.diag(k(gtr, gtr)), np.diag(k(gte, gte)))
    rows = gtr if block == "train_train" else gte
    raw = k(rows, gtr)
    np.testing.assert_array_equal(read_kernel(path, "trace", block), raw)
    dr, dc = np.einsum("ncp,ncp->n", rows, rows), np.einsum("ncp,ncp->n", gtr, gtr)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nan_to_num(raw / np.sqrt(np.outer(dr, dc)))
    got = read_kernel(path, "trace", block, normalize=True)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert np.all(got[1] == 0) and np.all(got[:, 1] == 0)
    if block == "train_train":
        np.testing.assert_allclose(np.diag(got)[[0, 2, 3, 4, 5]], 1.0)


def test_cosine_diagonal(tmp_path):
    rng = np.random.default_rng(2)
    gtr, gte = _features(rng, 6, 3), _features(rng, 4, 3)
    k = lambda a, b: np.einsum("ncp,mcp->nmc", a, b)  # noqa: E731
    dtr, dte = np.einsum("ncp,ncp->nc", gtr, gtr), np.einsum("ncp,ncp->nc", gte, gte)
    path = _kernel_file(tmp_path, "diagonal", k(gtr, gtr), k(gte, gtr), dtr, dte)
    got = read_kernel(path, "diagonal", "test_train", normalize=True)
    expected = np.zeros((4, 6, 3))
    for i in range(4):
        for j in range(6):
            for c in range(3):
                denom = np.sqrt(dte[i, c] * dtr[j, c])
                expected[i, j, c] = 0.0 if denom == 0 else k(gte, gtr)[i, j, c] / denom
    assert got.shape == (4, 6, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_cosine_full(tmp_path):
    rng = np.random.default_rng(3)
    gtr, gte = _features(rng, 6, 3), _features(rng, 4, 3)
    k = lambda a, b: np.einsum("ncp,mdp->nmcd", a, b)  # noqa: E731
    self_tr = np.einsum("ncp,ndp->ncd", gtr, gtr)  # (N, C, C) self blocks
    self_te = np.einsum("ncp,ndp->ncd", gte, gte)
    path = _kernel_file(tmp_path, "full", k(gtr, gtr), k(gte, gtr), self_tr, self_te)
    for block, rows, drows in (("train_train", gtr, self_tr), ("test_train", gte, self_te)):
        raw = k(rows, gtr)
        expected = np.zeros_like(raw)
        for i, j, c, d in np.ndindex(raw.shape):
            denom = np.sqrt(drows[i, c, c] * self_tr[j, d, d])
            expected[i, j, c, d] = 0.0 if denom == 0 else raw[i, j, c, d] / denom
        got = read_kernel(path, "full", block, normalize=True)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_read_kernel_errors(tmp_path):
    path = _make_run(tmp_path / "run.h5")
    with pytest.raises(BadInputError, match="no kernel 'trace'"):
        read_kernel(path, "trace")
    with pytest.raises(BadInputError, match="unknown kernel block"):
        read_kernel(path, "trace", block="test_test")
    with store.update_run(path) as (f, _):
        g = f.create_group("kernel/trace")
        store.set_attrs(g, {"complete": False})
        store.write_array(g, "train_train", np.zeros((2, 2)), ("train", "train"))
    with pytest.raises(BadInputError, match="incomplete"):
        read_kernel(path, "trace")


def test_open_rejects_non_runs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    for bad, pattern in (
        (text, "not an HDF5 file"),
        (plain, "not an ntk-explain run file"),
        (tmp_path / "missing.h5", "no such file"),
    ):
        for fn in (store.open_run, store.summarize, store.root_attrs, info_table):
            with pytest.raises(BadInputError, match=pattern) as info:
                fn(bad)
            assert "\n" not in str(info.value)
        with pytest.raises(BadInputError, match=pattern), store.update_run(bad):
            pytest.fail("body must not run")
    assert plain.read_bytes()[:4] == b"\x89HDF"
    assert _dir_listing(tmp_path) == ["notes.txt", "plain.h5"]


def test_newer_format_version_refused(tmp_path):
    path = tmp_path / "run.h5"
    with store.create_run(path, overwrite=False, attrs={**_attrs(), "format_version": 99}):
        pass
    with pytest.raises(BadInputError, match="newer"):
        store.open_run(path)


def test_summarize_and_info_table(tmp_path):
    path = _make_run(tmp_path / "run.h5")
    with store.update_run(path) as (f, _):
        g = f.create_group("kernel/trace")
        store.set_attrs(g, {"kernel": "trace", "projection": "gaussian", "proj_dim": 128, "complete": True})
        store.write_array(g, "train_train", np.zeros((5, 5), np.float32), ("train", "train"))
    items = {item["path"]: item for item in store.summarize(path)}
    assert next(iter(items)) == "/"
    assert items["/"]["attrs"]["format"] == "ntk-explain"
    assert items["/kernel/trace"]["kind"] == "group"
    assert items["/kernel/trace"]["attrs"] == {
        "kernel": "trace",
        "projection": "gaussian",
        "proj_dim": 128,
        "complete": True,
    }
    tt = items["/kernel/trace/train_train"]
    assert (tt["kind"], tt["shape"], tt["dtype"], tt["dims"]) == (
        "dataset",
        [5, 5],
        "float32",
        ["train", "train"],
    )
    json.dumps(list(items.values()))  # JSON-friendly for `info --json`

    console = Console(record=True, width=120)
    console.print(info_table(path))
    text = console.export_text()
    assert "/kernel/trace/train_train" in text
    assert "/data/train/labels" in text
    assert "5×5" in text
    assert "proj_dim=128" in text
    assert "train, train" in text

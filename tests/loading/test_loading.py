"""Loading and validating data sets and models (SPEC §7): formats, zoo, refusals of bad or unsafe input."""

import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from sklearn.datasets import load_digits
from torch import nn

from ntk_explain.errors import BadInputError, UsageError
from ntk_explain.loading import zoo
from ntk_explain.loading.data import load_dataset
from ntk_explain.loading.files import sha256_file
from ntk_explain.loading.models import check_model_on_data, load_model
from tests.processes import write_arrays

FACTORIES = """
import torch
from torch import nn


def make(width=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def not_a_module():
    return 42


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 10)
        self.c = nn.Linear(64, 10)
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.b(self.a(x.flatten(1))) + self.c(x.flatten(1))
"""


class Marker:
    """Unpickling it would create a file: a stand-in for code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def arrays(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.random((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def raises_bad(match: str):
    return pytest.raises(BadInputError, match=match)


def one_line(exc: pytest.ExceptionInfo, *names: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module of model factories in the working directory; returns its module name."""
    name = f"user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return name


def export(model: nn.Module, path: Path) -> str:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return str(path)


# --- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".h5", ".hdf5"])
def test_file_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    x, y = arrays()
    path = write_arrays(tmp_path / f"data{suffix}", x=x, y=y, other=np.zeros(3))
    data = load_dataset(path, "train")
    assert torch.equal(data.x, torch.from_numpy(x))
    assert data.y.dtype == torch.int64 and torch.equal(data.y, torch.from_numpy(y))
    assert data.index.dtype == np.int64 and np.array_equal(data.index, np.arange(12))
    assert data.source == path
    assert data.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha256_file(path)
    assert load_dataset(path, "test").sha256 == data.sha256


def test_keys_dtype_limit_and_integral_float_labels(tmp_path: Path) -> None:
    x, y = arrays()
    path = write_arrays(tmp_path / "d.npz", images=x.astype(np.float64) * 255, labels=y.astype(np.float32))
    data = load_dataset(path, "test", x_key="images", y_key="labels", dtype=torch.float64, limit=5)
    assert data.x.dtype == torch.float64 and data.x.shape == (5, 1, 8, 8)
    assert torch.equal(data.x, torch.from_numpy(x[:5].astype(np.float64) * 255))
    assert torch.equal(data.y, torch.from_numpy(y[:5]))
    assert np.array_equal(data.index, np.arange(5))
    assert load_dataset(path, "test", x_key="images", y_key="labels", limit=100).x.shape[0] == 12
    with pytest.raises(UsageError):
        load_dataset(path, "test", limit=0)


def test_h5_arrays_in_groups(tmp_path: Path) -> None:
    x, y = arrays()
    path = write_arrays(tmp_path / "d.h5", **{"set/x": x, "set/y": y})
    assert torch.equal(load_dataset(path, "train", x_key="set/x", y_key="set/y").x, torch.from_numpy(x))


def test_zoo_digits_split_is_deterministic_stratified_and_disjoint() -> None:
    train, test = load_dataset("zoo:digits", "train"), load_dataset("zoo:digits", "test")
    assert len(train.index) + len(test.index) == 1797
    assert np.array_equal(np.sort(np.concatenate([train.index, test.index])), np.arange(1797))
    assert np.all(np.diff(train.index) > 0) and np.all(np.diff(test.index) > 0)
    target = load_digits().target
    for c in range(10):
        assert (test.y == c).sum() == round(0.2 * (target == c).sum())
    images = load_digits().images
    assert train.x.shape == (1438, 1, 8, 8) and train.x.dtype == torch.float32
    assert torch.allclose(train.x[:, 0], torch.from_numpy(images[train.index] / 16).float())
    assert np.array_equal(train.y.numpy(), target[train.index])
    again = load_dataset("zoo:digits", "train")
    assert torch.equal(again.x, train.x) and again.sha256 == train.sha256 != test.sha256
    forced = load_dataset("zoo:digits:test", "train")
    assert np.array_equal(forced.index, test.index) and forced.sha256 == test.sha256
    assert np.array_equal(load_dataset("zoo:digits", "train", limit=7).index, train.index[:7])


def bad_data_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name → (spec, expected message fragment)."""
    x, y = arrays()
    garbage = b"this is not a data file" * 10
    for name in ("corrupt.npz", "corrupt.safetensors", "corrupt.h5", "d.csv"):
        (tmp_path / name).write_bytes(garbage)
    nan_x, inf_x = x.copy(), x.copy()
    nan_x[3, 0, 2, 2] = np.nan
    inf_x[5, 0, 0, 0] = np.inf
    return {
        "missing": (str(tmp_path / "absent.npz"), "file not found"),
        "corrupt npz": (str(tmp_path / "corrupt.npz"), "cannot read"),
        "corrupt safetensors": (str(tmp_path / "corrupt.safetensors"), "cannot read"),
        "corrupt h5": (str(tmp_path / "corrupt.h5"), "cannot read"),
        "unknown extension": (str(tmp_path / "d.csv"), "unknown format '.csv'"),
        "missing key": (write_arrays(tmp_path / "k.npz", x=x, z=y), r"no array named y \(arrays present: x, z\)"),
        "length": (write_arrays(tmp_path / "len.npz", x=x, y=y[:-1]), "has 12 rows but labels 'y' have 11"),
        "empty": (write_arrays(tmp_path / "empty.npz", x=x[:0], y=y[:0]), "empty"),
        "fractional labels": (write_arrays(tmp_path / "f.npz", x=x, y=y + 0.5), "integer class indices"),
        "string labels": (write_arrays(tmp_path / "s.h5", x=x, y=np.array([b"a"] * 12)), "integer class indices"),
        "negative labels": (write_arrays(tmp_path / "neg.npz", x=x, y=y - 20), "must be ≥ 0"),
        "2-D labels": (write_arrays(tmp_path / "2d.npz", x=x, y=y[:, None]), "must be 1-D"),
        "nan": (
            write_arrays(tmp_path / "nan.safetensors", x=nan_x, y=y),
            "NaN or infinite values in 1 rows .first: row 3",
        ),
        "inf": (write_arrays(tmp_path / "inf.h5", x=inf_x, y=y), "NaN or infinite values in 1 rows .first: row 5"),
        "object array": (write_arrays(tmp_path / "obj.npz", x=np.array([{}] * 12, dtype=object), y=y), "cannot read"),
        "unknown zoo": ("zoo:mnist", "unknown zoo data set 'mnist'"),
        "unknown zoo split": ("zoo:digits:val", "unknown split 'val'"),
    }


def test_bad_data_is_refused_with_one_line(tmp_path: Path) -> None:
    for name, (spec, fragment) in bad_data_cases(tmp_path).items():
        with raises_bad(fragment) as exc:
            load_dataset(spec, "train")
        assert one_line(exc, spec).startswith(f"train data {spec}: "), name


def test_directory_is_not_a_data_file(tmp_path: Path) -> None:
    (tmp_path / "dir.npz").mkdir()
    with raises_bad("not a file"):
        load_dataset(str(tmp_path / "dir.npz"), "train")


# --- models -------------------------------------------------------------------------------------------


def test_zoo_models_build_with_kwargs_and_hash_their_spec() -> None:
    loaded = load_model("zoo:mlp", {"hidden": [32]})
    assert not loaded.module.training and loaded.weights_sha256 is None
    assert [m.out_features for m in loaded.module if isinstance(m, nn.Linear)] == [32, 10]
    assert loaded.model_sha256 == load_model("zoo:mlp", {"hidden": [32]}).model_sha256
    assert loaded.model_sha256 != load_model("zoo:mlp").model_sha256
    assert load_model("zoo:mlp").module(torch.zeros(3, 64)).shape == (3, 10)
    cnn = load_model("zoo:cnn").module
    assert 20_000 <= sum(p.numel() for p in cnn.parameters()) <= 40_000
    assert cnn(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize(
    ("spec", "kwargs", "fragment"),
    [
        ("zoo:resnet", None, r"unknown zoo model \(available: mlp, cnn\)"),
        ("zoo:mlp", {"depth": 3}, "building with kwargs"),
        ("net.onnx", None, "expected zoo:NAME, pkg.module:factory or a .pt2 file"),
        ("no_such_module_xyz:make", None, "cannot import no_such_module_xyz"),
    ],
)
def test_bad_model_specs(spec: str, kwargs: dict | None, fragment: str) -> None:
    with raises_bad(fragment) as exc:
        load_model(spec, kwargs)
    one_line(exc, spec)


def test_factory_from_the_working_directory(factories: str) -> None:
    loaded = load_model(f"{factories}:make", {"width": 7})
    assert loaded.module[1].out_features == 7 and not loaded.module.training
    with raises_bad("has no callable 'absent'"):
        load_model(f"{factories}:absent")
    with raises_bad("returned int, not a torch.nn.Module"):
        load_model(f"{factories}:not_a_module")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_weights_load_into_zoo_models(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    trained = zoo.make_cnn()
    trained.train()(torch.rand(8, 1, 8, 8))  # moves the BatchNorm running statistics off their defaults
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(trained.state_dict(), path)
    else:
        torch.save({"state_dict": trained.state_dict(), "epoch": 3} if suffix == ".pt" else trained.state_dict(), path)
    loaded = load_model("zoo:cnn", weights=str(path))
    assert loaded.weights_sha256 == sha256_file(path)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.module(x), trained.eval()(x))


def test_tied_weights_saved_once_by_safetensors(tmp_path: Path, factories: str) -> None:
    torch.manual_seed(0)
    model = load_model(f"{factories}:Tied").module
    safetensors.torch.save_model(model, tmp_path / "tied.safetensors")
    loaded = load_model(f"{factories}:Tied", weights=str(tmp_path / "tied.safetensors")).module
    assert loaded.b.weight is loaded.c.weight
    assert torch.equal(loaded.c.weight, model.c.weight) and torch.equal(loaded.a.weight, model.a.weight)


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    state = zoo.make_mlp(hidden=(32,)).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["3.bias"]
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, path)
    with raises_bad("missing keys") as exc:
        load_model("zoo:mlp", weights=str(path))
    message = one_line(exc, str(path))
    assert "missing keys: 3.bias, 5.weight, 5.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "shape mismatches: 1.weight (32, 64) vs (128, 64) expected" in message


def test_bad_weight_files(tmp_path: Path) -> None:
    torch.save(zoo.make_mlp().state_dict(), tmp_path / "full.pt")
    (tmp_path / "corrupt.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:1000])
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage" * 20)
    (tmp_path / "w.bin").write_bytes(b"")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    cases = {
        "absent.safetensors": "file not found",
        "corrupt.pt": "cannot read",
        "corrupt.safetensors": "cannot read",
        "w.bin": "unknown format '.bin'",
        "list.pt": "not a state dict",
    }
    for name, fragment in cases.items():
        with raises_bad(fragment) as exc:
            load_model("zoo:mlp", weights=str(tmp_path / name))
        assert one_line(exc).startswith(f"weights {tmp_path / name}: ")


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_code_executing_pickle_is_refused(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"0.weight": Marker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Marker(marker)))
    with raises_bad(r"refused: not loadable as plain tensors \(Unsupported .*\); unpickling it could run code"):
        load_model("zoo:mlp", weights=str(path))
    assert not marker.exists()


def test_exported_program_loads_and_gives_the_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.make_mlp().eval()
    path = export(model, tmp_path / "mlp.pt2")
    loaded = load_model(path)
    assert loaded.model_sha256 == sha256_file(path)
    module = loaded.module
    assert module.eval() is module and not module.training
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(module(x), model(x), atol=1e-6)
    assert check_model_on_data(module, load_dataset("zoo:digits", "test")) == 10

    torch.manual_seed(1)
    other = zoo.make_mlp()
    torch.save(other.state_dict(), tmp_path / "other.pt")
    reloaded = load_model(path, weights=str(tmp_path / "other.pt")).module
    assert torch.allclose(reloaded(x), other(x), atol=1e-6)


def test_exported_program_refusals(tmp_path: Path) -> None:
    path = export(zoo.make_mlp().eval(), tmp_path / "mlp.pt2")
    with pytest.raises(UsageError):
        load_model(path, {"hidden": [3]})
    (tmp_path / "corrupt.pt2").write_bytes(b"garbage")
    with raises_bad("cannot load the exported program"):
        load_model(str(tmp_path / "corrupt.pt2"))
    with raises_bad("file not found"):
        load_model(str(tmp_path / "absent.pt2"))
    train_mode = export(zoo.make_cnn().train(), tmp_path / "train.pt2")
    with raises_bad(r"exported in train\(\) mode"):
        load_model(train_mode)


def test_exported_program_with_a_pickled_payload_is_refused(tmp_path: Path) -> None:
    """torch.export.load falls back to full unpickling for weights marked use_pickle; it must not here."""
    marker = tmp_path / "marker"
    payload = io.BytesIO()
    torch.save(Marker(marker), payload)
    source = zipfile.ZipFile(export(zoo.make_mlp().eval(), tmp_path / "mlp.pt2"))
    config_name = next(n for n in source.namelist() if n.endswith("model_weights_config.json"))
    config = json.loads(source.read(config_name))
    entry = config["config"]["1.weight"]
    entry["use_pickle"] = True
    weight_name = f"{config_name.rsplit('/', 1)[0]}/{entry['path_name']}"
    replaced = {config_name: json.dumps(config).encode(), weight_name: payload.getvalue()}
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(evil, "w") as target:
        for info in source.infolist():
            target.writestr(info, replaced.get(info.filename) or source.read(info.filename))
    with raises_bad("refused: not loadable as plain tensors"):
        load_model(str(evil))
    assert not marker.exists()


# --- model × data -------------------------------------------------------------------------------------


class Constant(nn.Module):
    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output


def test_check_model_on_data() -> None:
    data = load_dataset("zoo:digits", "train", limit=50)
    assert check_model_on_data(zoo.make_cnn().train(), data) == 10
    cases = [
        (zoo.make_mlp(in_features=10), r"model cannot take inputs of shape \(1, 1, 8, 8\): mat1 and mat2"),
        (Constant(torch.zeros(10)), r"shape \(1, C\), got \(10,\)"),
        (Constant(torch.zeros(1, 10, dtype=torch.int64)), "floating logits"),
        (Constant((1, 2)), "got tuple"),
        (Constant(torch.full((1, 10), float("nan"))), "not finite"),
        (zoo.make_mlp(n_classes=5), "label 9 but the model has only 5 outputs"),
    ]
    for model, fragment in cases:
        with raises_bad(fragment) as exc:
            check_model_on_data(model, data)
        one_line(exc)

"""The public Python API: every exported name resolves, `import ntk_explain` stays light, and the README's notebook
example runs as written and gives the numbers it describes."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ntk_explain
from ntk_explain.errors import BadInputError
from ntk_explain.loading import zoo

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The Python block of the README's "From Python" section."""
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("name", ntk_explain.__all__)
def test_every_exported_name_resolves_with_every_module_imported(name):
    """An import of a subpackage sets it as an attribute of the package: none may share an exported name."""
    for module in pkgutil.walk_packages(ntk_explain.__path__, "ntk_explain."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    value = getattr(ntk_explain, name)
    assert isinstance(value, types.ModuleType) == (name == "zoo")


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'kernels'"):
        ntk_explain.kernels  # noqa: B018


def test_import_loads_neither_torch_nor_h5py():
    code = "import sys, ntk_explain; ntk_explain.KernelSpec; print(sorted({'torch', 'h5py'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_example_runs_and_its_scores_sum_to_the_surrogate_logits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    torch.manual_seed(0)
    x, y, _ = zoo.digits("train")
    model = zoo.train_classifier(zoo.make_cnn(), torch.as_tensor(x[:400]), torch.as_tensor(y[:400]), epochs=3)
    save_file(model.state_dict(), "runs/demo.safetensors")
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    explained, kernel = namespace["explained"], namespace["kernel"]
    assert explained["scores"].shape == (50, 400) and kernel.shape == (50, 400)
    assert explained["topk_index"].shape == (50, 5)
    with h5py.File("runs/notebook.h5", "r") as f:
        logits = f["surrogate/logits_test"][()]
        raw, diag_test, diag_train = (f[f"kernel/trace/{key}"][()] for key in ("test_train", "diag_test", "diag_train"))
    np.testing.assert_allclose(kernel, raw / np.sqrt(diag_test[:, None] * diag_train[None]), rtol=1e-5)
    np.testing.assert_allclose(explained["scores"].sum(1), logits[np.arange(50), explained["class"]], rtol=1e-6)
    printed = capsys.readouterr().out
    assert re.match(r"tau -?\d\.\d{3}, agreement \d\.\d{3}\n", printed)
    assert f"class {explained['class'][0]} proponents" in printed
    with pytest.raises(BadInputError, match="has no /distill/attribution"):
        ntk_explain.read_attribution("runs/notebook.h5", distilled=True)

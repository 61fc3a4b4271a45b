"""The same stages on a CUDA device (skipped without one; `scripts/gpu_check.sh` runs them on a lent GPU): exact
kernels in float64 against the CPU jacrev reference, projected kernels unbiased, compute (against the CPU's), attribute
and distill through the command line, and two NCCL ranks against one process where there are two GPUs."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ntk_explain import Budget, KernelSpec, compute_kernel, create_run, featurizer, gram
from ntk_explain.cli import app
from tests import reference
from tests.architectures import ARCHITECTURES, reference_jacobian
from tests.models import MODELS
from tests.processes import cli_env, float64_cnn_compute
from tests.reference import rel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", ["mlp", "cnn", "normed", "bag", "positions", "conv1d"])
@pytest.mark.parametrize("kind", ["full", "trace", "pseudo"])
def test_exact_kernels_on_cuda_match_the_reference(tmp_path, name, kind):
    factory, shape, vocabulary = MODELS[name]
    generator = torch.Generator().manual_seed(0)
    if vocabulary:
        x = torch.randint(0, vocabulary, (9, *shape), generator=generator).double()
    else:
        x = torch.randn(9, *shape, generator=generator, dtype=torch.float64)
    model = factory()
    with create_run(tmp_path / "run.h5", overwrite=True, attrs={}) as run:
        compute_kernel(
            run, model.to(CUDA), KernelSpec(kind), x[:6].to(CUDA), x[6:].to(CUDA), Budget(CUDA, 2**30, tile=4)
        )
        got = {block: run[f"kernel/{kind}/{block}"][()] for block in ("train_train", "test_train")}
    j_train, j_test = reference.jacobian(factory(), x[:6]), reference.jacobian(factory(), x[6:])
    assert rel(got["train_train"], reference.kernel(j_train, j_train, kind)) < 1e-8
    assert rel(got["test_train"], reference.kernel(j_test, j_train, kind)) < 1e-8


@pytest.mark.parametrize("name", ["transformer_block", "hf_bert", "preact_resnet"])
def test_architectures_on_cuda_match_the_reference(name):
    arch = ARCHITECTURES[name]
    batch = arch.inputs(5, 0)
    on_device = batch.to(CUDA) if isinstance(batch, torch.Tensor) else {k: v.to(CUDA) for k, v in batch.items()}
    features = featurizer(arch.factory().to(CUDA), KernelSpec("trace"), on_device, Budget(CUDA, 2**30))
    factors = features.featurize(on_device)
    jac = reference_jacobian(arch.factory(), batch)
    assert rel(gram(factors, factors, "trace").cpu(), reference.kernel(jac, jac, "trace")) < 1e-8


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "tensorsketch", "kronecker"])
def test_projected_kernels_on_cuda_are_unbiased(kind):
    factory, shape, _ = MODELS["cnn"]
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jac = reference.jacobian(factory(), x)
    exact = reference.kernel(jac, jac, "trace").numpy()
    model, runs = factory().to(CUDA), []
    for seed in range(64):
        phi = featurizer(model, KernelSpec("trace", kind, 64, seed), x.to(CUDA), Budget(CUDA, 2**30)).featurize(
            x.to(CUDA)
        )
        flat = phi.dense.reshape(len(x), -1)
        runs.append((flat @ flat.T).cpu().numpy())
    single = np.mean([rel(run, exact) for run in runs])
    assert rel(np.mean(runs, axis=0), exact) <= 0.6 * single + 1e-12


def test_compute_attribute_and_distill_on_cuda(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(60, 1, 4, 4)), y=rng.integers(0, 3, 60))
    data = ["--model", "tests.models:cnn", "--train", str(tmp_path / "data.npz"), "--test", str(tmp_path / "data.npz")]
    run = str(tmp_path / "run.h5")
    for args in (
        ["compute", *data, "--kernel", "trace,pseudo", "--dtype", "float64", "--device", "cuda", "--out", run],
        ["attribute", run, "--device", "cuda"],
        [
            "distill",
            *data,
            "--device",
            "cuda",
            "--method",
            "kip",
            "--steps",
            "5",
            "--per-class",
            "2",
            "--proj-dim",
            "64",
            "--out",
            str(tmp_path / "distilled.h5"),
        ],
    ):
        result = CliRunner().invoke(app, [*args, "--quiet"])
        assert result.exit_code == 0, result.output
    on_cpu = str(tmp_path / "cpu.h5")
    result = CliRunner().invoke(app, ["compute", *data, "--kernel", "trace", "--dtype", "float64", "--out", on_cpu])
    assert result.exit_code == 0, result.output
    with h5py.File(run, "r") as cuda, h5py.File(on_cpu, "r") as cpu:
        for block in ("train_train", "test_train", "diag_train"):
            assert rel(cuda[f"kernel/trace/{block}"][()], cpu[f"kernel/trace/{block}"][()]) < 1e-10, block
        assert cuda["faithfulness"].attrs["agreement"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_two_nccl_ranks_give_the_kernels_of_one_process(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(40, 1, 4, 4)), y=rng.integers(0, 3, 40))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for out, command in (("one.h5", [sys.executable]), ("two.h5", launcher)):
        args = float64_cnn_compute(out, "--kernel", "trace,pseudo", "--device", "cuda", "--quiet")
        done = subprocess.run([*command, "-m", "ntk_explain", *args], cwd=tmp_path, env=cli_env(), capture_output=True)
        assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(tmp_path / "one.h5", "r") as one, h5py.File(tmp_path / "two.h5", "r") as two:
        assert two.attrs["world_size"] == 2
        for name in ("trace", "pseudo"):
            for block in ("train_train", "test_train", "diag_train", "diag_test"):
                assert rel(two[f"kernel/{name}/{block}"][()], one[f"kernel/{name}/{block}"][()]) < 1e-12, block

"""Every kernel against the float64 jacrev reference, through the tiled pipeline into HDF5."""

import h5py
import numpy as np
import pytest
import torch

from ntk_explain import store
from ntk_explain.features import featurizer as featurizer_module
from ntk_explain.features.modules import patches
from ntk_explain.features.planning import plan_tangents
from ntk_explain.features.projected import project
from ntk_explain.features.projections import Projection, fft_dims, generator, hashes, sketch_shares, split_dims
from ntk_explain.features.sketches import sketch, sketch_layout
from ntk_explain.features.tangents import penultimate, tangent_factors
from ntk_explain.kernel.grams import symmetric_gram
from ntk_explain.kernel.normalize import cosine_normalize
from ntk_explain.loading.models import load_model
from ntk_explain.options import Budget, KernelSpec
from ntk_explain.stages.kernels import compute_kernel
from tests import reference
from tests.models import MODELS, data
from tests.reference import rel

TOL = 1e-8


def computed(tmp_path, model, spec, train, test, batch_size=None, max_memory=2**30, tile=None):
    path = tmp_path / f"{spec.name}-{batch_size}-{tile}.h5"
    budget = Budget(torch.device("cpu"), max_memory, batch_size, tile=tile)
    with store.create_run(path, overwrite=True, attrs={}) as run:
        compute_kernel(run, model, spec, train, test, budget)
    with h5py.File(path) as run:
        group = run[f"kernel/{spec.name}"]
        return {name: group[name][()] for name in ("train_train", "test_train", "diag_train", "diag_test")}, dict(
            group.attrs
        )


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["full", "diagonal", "trace", "pseudo"])
def test_exact_kernels_match_jacrev(tmp_path, name, kind):
    model = MODELS[name][0]()
    train, test = data(name, 7, 0), data(name, 4, 1)
    # tiles of 3: off-diagonal blocks are mirrored and features recomputed or kept; passes of 2: tiles joined
    got, attrs = computed(tmp_path, model, KernelSpec(kind), train, test, batch_size=2, tile=3)
    j_train, j_test = reference.jacobian(model, train), reference.jacobian(model, test)
    assert rel(got["train_train"], reference.kernel(j_train, j_train, kind)) < TOL
    assert rel(got["test_train"], reference.kernel(j_test, j_train, kind)) < TOL
    assert rel(got["diag_train"], reference.self_kernel(j_train, kind)) < TOL
    assert rel(got["diag_test"], reference.self_kernel(j_test, kind)) < TOL
    assert attrs["complete"] and attrs["n_params"] == j_train.shape[2]


def test_structured_layers_are_chosen_per_layer():
    """Linear and the one-site conv are factorised; convs with many sites are formed (Σ_s δ_s ã_sᵀ, dense columns
    without jacrev); a layer applied twice is factorised with K = 3 outputs, formed with K = 1 (pseudo); a conv
    applied twice is formed from both calls."""
    cnn = MODELS["cnn"][0]()
    plan = plan_tangents(cnn, data("cnn", 2, 0))
    assert [layer.module for layer in plan.layers] == ["6", "9"]
    assert [(layer.module, layer.sites) for layer in plan.formed] == [("0", 16), ("3", 4)]
    assert {"0.weight", "1.weight", "3.weight", "4.bias"} <= set(plan.dense) and plan.jacobian == ()
    twice = plan_tangents(MODELS["twice"][0](), data("twice", 2, 0))
    assert [(layer.module, layer.sites) for layer in twice.layers] == [("inner", 2), ("head", 1)]
    pseudo = plan_tangents(MODELS["twice"][0](), data("twice", 2, 0), "pseudo")
    assert [layer.module for layer in pseudo.layers] == ["head"]
    assert [(layer.module, layer.sites) for layer in pseudo.formed] == [("inner", 2)]
    reused = plan_tangents(MODELS["convtwice"][0](), data("convtwice", 2, 0))
    assert [(layer.module, layer.sites, len(layer.call_shapes)) for layer in reused.formed] == [("conv", 32, 2)]


def test_symmetric_gram_is_the_product():
    x = torch.randn(11, 5, dtype=torch.float64)
    assert rel(symmetric_gram(x, leaf=2), x @ x.T) < 1e-15


@pytest.mark.parametrize("output", ["logits", "pseudo"])
def test_embeddings_and_normalisations_are_structured_unless_shared(output):
    """Normalisation γ, β are formed from δ and x̂ (dense columns, no jacrev), BatchNorm's in eval mode only; an
    Embedding is a lookup when S²(K·d + 1) ≤ K·V·d (6 sites: V = 48 but not V = 20), with its padding_idx; a tied
    Embedding stays dense (and exact: `tied` in MODELS)."""

    def plan(name):
        return plan_tangents(MODELS[name][0](), data(name, 2, 0), output)

    cnn = plan("cnn")
    assert [(a.module, a.weight, a.bias, a.channels) for a in cnn.affines] == [
        ("1", "1.weight", "1.bias", 4),
        ("4", "4.weight", "4.bias", 6),
    ]
    assert {"1.weight", "4.bias"} <= set(cnn.dense) and not {"1.weight", "4.bias"} & set(cnn.jacobian)
    assert not plan_tangents(MODELS["cnn"][0]().train(), data("cnn", 2, 0), output).affines  # batch statistics
    normed = plan("normed")
    assert [(a.module, a.channels, a.bias) for a in normed.affines] == [
        ("norm", 8, "norm.bias"),
        ("rms", 8, None),
        ("joint", 24, None),
    ]
    assert [layer.module for layer in normed.formed] == ["proj"] and normed.jacobian == ()  # 3 sites: formed
    grouped = plan("grouped")
    assert [a.module for a in grouped.affines] == ["1", "6"]
    assert [layer.module for layer in grouped.formed] == ["0", "3"]  # 16 and 4 sites: formed convs
    bag = plan("bag")
    assert [(e.module, e.rows, e.features, e.sites) for e in bag.lookups] == [("embed", 48, 5, 6)]
    assert "embed.weight" not in bag.dense
    assert not plan_tangents(MODELS["bag"][0](vocabulary=20), data("bag", 2, 0) % 20, output).lookups
    padded = MODELS["bag"][0]()
    padded.embed.padding_idx = 0
    assert [e.padding_idx for e in plan_tangents(padded, data("bag", 2, 0), output).lookups] == [0]  # δ = 0 there
    tied = plan("tied")
    assert not tied.lookups and not tied.layers and tied.jacobian == ("embed.weight", "head.bias")


@pytest.mark.parametrize(
    ("name", "names", "count"),
    [("mlp", ("1.bias", "5.weight", "5.bias"), 8 + 8 * 3 + 3), ("cnn", ("0.bias", "3.weight"), 4 + 6 * 4 * 2 * 2)],
    ids=["factorised", "formed"],
)
def test_params_glob_restricts_the_kernel(tmp_path, name, names, count):
    """A weight or a bias alone of a factorised (mlp) or formed (the cnn's convs) layer."""
    model = MODELS[name][0]()
    train, test = data(name, 6, 0), data(name, 3, 1)
    got, attrs = computed(tmp_path, model, KernelSpec("trace", params=names), train, test)
    j_train, j_test = reference.jacobian(model, train, names), reference.jacobian(model, test, names)
    assert attrs["n_params"] == j_train.shape[2] == count
    layers = [list(attrs[how]) for how in ("factorised", "formed")]  # the modules of the selected parameters
    assert layers == ([["1", "5"], [""]] if name == "mlp" else [[""], ["0", "3"]])
    assert rel(got["test_train"], reference.kernel(j_test, j_train, "trace")) < TOL


def test_conjugate_kernel(tmp_path):
    model = MODELS["cnn"][0]()
    train, test = data("cnn", 5, 0), data("cnn", 3, 1)
    got, _ = computed(tmp_path, model, KernelSpec("ck"), train, test, tile=2)
    with torch.no_grad():
        phi_train, phi_test = model[:-1](train), model[:-1](test)
    assert torch.equal(penultimate(model, train), phi_train)
    assert rel(got["train_train"], phi_train @ phi_train.T) < TOL
    assert rel(got["test_train"], phi_test @ phi_train.T) < TOL
    assert rel(got["diag_test"], (phi_test**2).sum(1)) < TOL


def test_tiles_do_not_change_the_kernel(tmp_path):
    model = MODELS["twice"][0]()
    train, test = data("twice", 9, 0), data("twice", 5, 1)
    one, _ = computed(tmp_path, model, KernelSpec("full"), train, test)
    # a budget so small that every tile is one row and nothing is kept
    tiled, attrs = computed(tmp_path, model, KernelSpec("full"), train, test, max_memory=1)
    assert attrs["tile"] == 1
    for key, value in one.items():
        np.testing.assert_allclose(tiled[key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("block_numel", [50, 4096])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_projected_features_are_R_times_the_jacobian(name, kind, block_numel):
    """R g for every sample and output, R formed explicitly from its columns (small P only); gradients projected a
    column (an embedding row) at a time or in blocks (runs of consecutive embedding rows)."""
    model = MODELS[name][0]()
    x = data(name, 4, 0)
    plan = plan_tangents(model, x)
    projection = Projection(kind, 64, seed=3)
    got = project(plan, tangent_factors(model, plan, x), projection, block_numel=block_numel)
    jac = reference.jacobian(model, x)
    columns = projection.columns(0, plan.n_params, torch.device("cpu"))
    if kind == "sparse":
        matrix = torch.zeros(64, plan.n_params, dtype=torch.float64)
        matrix[columns[0], torch.arange(plan.n_params)] = columns[1].double()
    else:
        matrix = columns.double()
    assert rel(got, jac @ matrix.T) < 1e-12


def test_projection_columns_do_not_depend_on_the_range():
    projection = Projection("gaussian", 300, seed=5)
    whole = projection.columns(0, 20000, torch.device("cpu"))
    parts = torch.cat(
        [projection.columns(a, min(20000, a + 777), torch.device("cpu")) for a in range(0, 20000, 777)], 1
    )
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, Projection("gaussian", 300, seed=6).columns(0, 20000, torch.device("cpu")))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse", "tensorsketch", "kronecker"])
@pytest.mark.parametrize(
    ("name", "params"),
    [("mlp", None), ("bag", ("embed.weight",)), ("normed", ("norm.weight", "norm.bias", "rms.weight", "joint.weight"))],
    ids=["mlp", "embedding", "normalisations"],
)
def test_projected_kernels_are_unbiased(tmp_path, name, params, kind):
    """The mean over 16 seeds is much closer to the exact kernel than one seed is (error ~ 1/√seeds); also for the
    kernel of an embedding alone (a lookup) and of normalisation parameters alone (affine), the sketches' generic
    group then."""
    model = MODELS[name][0]()
    train, test = data(name, 6, 0), data(name, 3, 1)
    j_train = reference.jacobian(model, train, params)
    exact = reference.kernel(j_train, j_train, "trace").numpy()
    runs = [
        computed(tmp_path, model, KernelSpec("trace", kind, 32, seed, params=params), train, test)[0]["train_train"]
        for seed in range(16)
    ]
    single = np.mean([rel(run, exact) for run in runs])
    mean = rel(np.mean(runs, axis=0), exact)
    assert mean < 0.6 * single
    assert mean < 0.2


def test_projected_cnn_cosine_trace_kernel_is_accurate(tmp_path):
    """Acceptance: cosine-normalised projected trace kernel of the CNN, d = 4096, error < 0.1."""
    model = MODELS["cnn"][0]()
    train, test = data("cnn", 12, 0), data("cnn", 6, 1)
    got, attrs = computed(tmp_path, model, KernelSpec("trace", "gaussian", 4096), train, test)
    j_train, j_test = reference.jacobian(model, train), reference.jacobian(model, test)
    exact = cosine_normalize(
        reference.kernel(j_test, j_train, "trace").numpy(),
        reference.self_kernel(j_test, "trace").numpy(),
        reference.self_kernel(j_train, "trace").numpy(),
    )
    approx = cosine_normalize(got["test_train"], got["diag_test"], got["diag_train"])
    assert attrs["proj_dim"] == 4096 and attrs["projection"] == "gaussian"
    assert rel(approx, exact) < 0.1


def test_projected_features_do_not_depend_on_tiles_or_budget(tmp_path):
    """The same seed gives the same stored features whatever the tile size and memory budget."""
    model = MODELS["cnn"][0]()
    train, test = data("cnn", 7, 0), data("cnn", 3, 1)
    spec = KernelSpec("pseudo", "gaussian", 48, seed=11)
    paths = []
    for batch_size, max_memory in ((None, 2**30), (2, 2**14)):
        path = tmp_path / f"run-{batch_size}.h5"
        with store.create_run(path, overwrite=True, attrs={}) as run:
            compute_kernel(run, model, spec, train, test, Budget(torch.device("cpu"), max_memory, batch_size))
        paths.append(path)
    with h5py.File(paths[0]) as one, h5py.File(paths[1]) as other:
        assert one["kernel/pseudo-gaussian-48"].attrs["tile"] != other["kernel/pseudo-gaussian-48"].attrs["tile"]
        for split in ("train", "test"):
            a, b = (
                one[f"kernel/pseudo-gaussian-48/features/{split}"][()],
                other[f"kernel/pseudo-gaussian-48/features/{split}"][()],
            )
            assert a.shape == (len(train) if split == "train" else len(test), 1, 48)
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_exported_program_kernel(tmp_path):
    """A torch.export archive has no nn.Linear modules left: every parameter takes the Jacobian path."""

    model = MODELS["cnn"][0]()
    train, test = data("cnn", 5, 0), data("cnn", 3, 1)
    program = torch.export.export(model, (train,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    exported = load_model(str(tmp_path / "cnn.pt2")).module
    got, _ = computed(tmp_path, exported, KernelSpec("diagonal"), train, test, tile=2)
    j_train, j_test = reference.jacobian(model, train), reference.jacobian(model, test)
    assert rel(got["test_train"], reference.kernel(j_test, j_train, "diagonal")) < TOL


def _count_sketch_matrix(seed: int, stream: int, size: int, dim: int) -> torch.Tensor:
    """The CountSketch of hashes (seed, stream) as a (dim, size) matrix."""
    buckets, signs = hashes(seed, stream, size, dim, torch.device("cpu"))
    matrix = torch.zeros(dim, size, dtype=torch.float64)
    matrix[buckets, torch.arange(size)] = signs.double()
    return matrix


def _generic_sketch(plan, factors, seed: int, dim: int, groups: int) -> torch.Tensor:
    """CountSketch matrices (hashes (seed, 0) over the dense columns, (seed, 2(G + e)) over lookup e for G groups)
    times the dense gradients and every embedding's gradient Σ_s δ_s e_{i_s}ᵀ, one-hot formed."""
    sketched = factors.dense @ _count_sketch_matrix(seed, 0, factors.dense.shape[-1], dim).T
    lookups = zip(plan.lookups, factors.lookup_deltas, factors.indices, strict=True)
    for stream, (lookup, delta, rows) in enumerate(lookups, start=groups):
        gradient = torch.einsum("nksd,nsv->nkvd", delta, torch.nn.functional.one_hot(rows, lookup.rows).double())
        sketched = (
            sketched + gradient.flatten(2) @ _count_sketch_matrix(seed, 2 * stream, gradient[0, 0].numel(), dim).T
        )
    return sketched


def _rest_tensorsketch(rest: torch.Tensor, dim: int, seed: int, group: int) -> torch.Tensor:
    """TS(R)_b = Σ_{(h₁(o) + h₂(i)) mod d = b} s₁(o) s₂(i) R_oi for R (n, K, O, I), hashes (seed, 2g) and
    (seed, 2g + 1)."""
    h1, s1 = hashes(seed, 2 * group, rest.shape[-2], dim, torch.device("cpu"))
    h2, s2 = hashes(seed, 2 * group + 1, rest.shape[-1], dim, torch.device("cpu"))
    out = torch.zeros(*rest.shape[:2], dim, dtype=torch.float64)
    sign = (s1[:, None] * s2[None, :]).double()
    return out.index_add_(2, ((h1[:, None] + h2[None, :]) % dim).flatten(), (rest * sign).flatten(2))


def _rest_kronecker(rest: torch.Tensor, dim: int, seed: int, group: int) -> torch.Tensor:
    """(R_out ⊗ R_in)ᵀ vec(R) for R (n, K, O, I), Gaussian R_out (O, a) and R_in (I, b), a = ⌊√d⌋, b = ⌊d/a⌋,
    zero-padded."""
    a, b = int(np.sqrt(dim)), dim // int(np.sqrt(dim))
    g = generator(seed, 0x2545F491 * (group + 1), torch.device("cpu"))
    r_out = torch.randn(rest.shape[-2], a, generator=g).double() / np.sqrt(a)
    r_in = torch.randn(rest.shape[-1], b, generator=g).double() / np.sqrt(b)
    return torch.nn.functional.pad(torch.einsum("nkoi,oa,ib->nkab", rest, r_out, r_in).flatten(2), (0, dim - a * b))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["tensorsketch", "kronecker"])
def test_sketch_is_its_definition(name, kind):
    """The sketch of 3 samples at d = 40 against its definition from each layer's formed gradient G = Σ_s δ_s ã_sᵀ:
    u, v the unit means of δ and ã over the probe, the rows uᵀG and columns (I − uuᵀ)Gv as they are or by a
    CountSketch matrix, the rest (I − uuᵀ)G(I − vvᵀ) by the TensorSketch definition or the Kronecker product; the
    three pieces are orthogonal (their energies sum to G's); the generic group by CountSketch matrices."""
    model = MODELS[name][0]()
    x = data(name, 3, 0)
    plan = plan_tangents(model, x)
    factors = tangent_factors(model, plan, x)
    layout = sketch_layout(factors, 40, kind)
    got = sketch(plan, factors, Projection(kind, 40, seed=7), layout)
    assert got.shape == (3, plan.outputs, 40) and len(layout.dims) == len(layout.groups)
    parts = []
    if layout.groups[0] == "generic":
        exact = layout.exact[0]
        parts.append(factors.dense if exact else _generic_sketch(plan, factors, 7, layout.dims[0], len(layout.dims)))
    rest_sketch = _rest_tensorsketch if kind == "tensorsketch" else _rest_kronecker
    for index, (delta, inputs) in enumerate(zip(factors.deltas, factors.inputs, strict=True)):
        group = len(parts)
        u = torch.nn.functional.normalize(delta.sum((0, 1, 2)), dim=0)
        v = torch.nn.functional.normalize(inputs.sum((0, 1)), dim=0)
        assert layout.groups[group : group + 3] == [f"{index}/rows", f"{index}/columns", f"{index}/rest"]
        assert rel(layout.directions[index][0], u) < 1e-12 and rel(layout.directions[index][1], v) < 1e-12
        gradient = torch.einsum("nkso,nsi->nkoi", delta, inputs)
        across, off = torch.eye(len(u)) - torch.outer(u, u), torch.eye(len(v)) - torch.outer(v, v)
        rows = torch.einsum("o,nkoi->nki", u, gradient)
        columns = torch.einsum("po,nkoi,i->nkp", across, gradient, v)
        rest = torch.einsum("po,nkoi,ij->nkpj", across, gradient, off)
        energies = [float(t.square().sum()) for t in (rows, columns, rest)]
        assert sum(energies) == pytest.approx(float(gradient.square().sum()), rel=1e-12)
        for offset, piece in enumerate((rows, columns)):
            g = group + offset
            matrix = _count_sketch_matrix(7, 2 * g, piece.shape[-1], layout.dims[g])
            parts.append(piece if layout.exact[g] else piece @ matrix.T)
        parts.append(rest_sketch(rest, layout.dims[group + 2], 7, group + 2))
    expected = torch.cat(parts, dim=-1)
    assert rel(got, torch.nn.functional.pad(expected, (0, 40 - expected.shape[-1]))) < 1e-12


def test_fft_dims_are_3_smooth_and_use_what_they_free():
    """The MLP's energy shares at d = 4096 (sizes 11·163, 2·7·83, 7·163: FFTs 5–10× slower than 3-smooth ones)."""
    assert fft_dims([1793, 1162, 1141], [True] * 3, None) == [1728, 1296, 1024]  # 48 unused: no share fits them
    assert fft_dims([487, 2726, 883], [False, True, True], 0) == [532, 2592, 972]  # the spare share takes the rest
    assert fft_dims([10, 487, 2726, 883], [False, False, True, True], 1) == [10, 532, 2592, 972]
    for dims in ([1, 2, 5], [40], [7, 300, 13, 97]):
        sized = fft_dims(dims, [True] * len(dims), None)
        assert all(_three_smooth(size) for size in sized) and sum(dims) - min(dims) < sum(sized) <= sum(dims)


def _three_smooth(size: int) -> bool:
    for prime in (2, 3):
        while size % prime == 0:
            size //= prime
    return size == 1


def test_sketch_shares_keep_dense_groups_exactly():
    """Sketched groups share d by energy; a group of fixed size is kept exactly when that lowers the variance bound
    (E − E_g)²/(d − s_g) < E²/d, taking groups by energy per coordinate; TensorSketch shares are 3-smooth."""
    assert sketch_shares(100, [10, 30, 60], [None] * 3, [False] * 3) == ([10, 30, 60], [False] * 3)
    # half the energy in 10 coordinates: 50²/90 < 100²/100, kept
    assert sketch_shares(100, [50, 50], [10, None], [False, False]) == ([10, 90], [True, False])
    # 1% of the energy in 50 coordinates: 99²/50 > 100²/100, sketched
    assert sketch_shares(100, [1, 99], [50, None], [False, False]) == ([1, 99], [False, False])
    # the denser candidate first (50²/90 < 100²/100); the second then no longer pays (40²/30 > 50²/90)
    assert sketch_shares(100, [50, 10, 40], [10, 60, None], [False, False, False]) == (
        [10, 18, 72],
        [True, False, False],
    )
    # a group without energy keeps one dimension (its energy on other rows may not be 0); empty groups are free
    assert sketch_shares(10, [0, 5, 0], [None, None, 0], [False] * 3) == ([1, 9, 0], [False, False, True])
    dims, exact = sketch_shares(4096, [1, 30, 60, 9], [500, 800, None, None], [False, False, True, True])
    assert exact == [False, True, False, False] and dims[1] == 800 and sum(dims) == 4096
    assert _three_smooth(dims[2]) and _three_smooth(dims[3])


def test_sketch_layout_is_stored(tmp_path):
    """The layout of a pseudo tensorsketch of the test MLP: its head's δ is the same for every sample (1/√C), so the
    head's columns and rest are 0 and its rows, the whole gradient, are kept exactly; the attributes say so."""
    model = MODELS["mlp"][0]()
    train, test = data("mlp", 10, 0), data("mlp", 3, 1)
    got, attrs = computed(tmp_path, model, KernelSpec("pseudo", "tensorsketch", 40), train, test)
    j_train, j_test = reference.jacobian(model, train), reference.jacobian(model, test)
    assert list(attrs["sketch_groups"]) == [
        f"{layer}/{piece}" for layer in range(3) for piece in ("rows", "columns", "rest")
    ]
    assert sum(attrs["sketch_dims"]) <= 40 and attrs["sketch_probe"] == 10
    assert list(attrs["sketch_exact"][6:]) == [True, False, False] and attrs["sketch_dims"][6] == 9  # 8 inputs + bias
    assert rel(got["test_train"], reference.kernel(j_test, j_train, "pseudo")) < 0.5


def test_sketch_dimensions_follow_layer_sizes():
    assert split_dims(10, [1, 1]) == [5, 5]
    assert split_dims(100, [900, 90, 10]) == [90, 9, 1]
    assert split_dims(100, [995, 4, 1]) == [98, 1, 1]
    assert split_dims(3, [10**6, 1, 1]) == [1, 1, 1]
    dims = split_dims(4096, [401920, 262656, 5130])
    assert sum(dims) == 4096 and dims[0] > dims[1] > dims[2] >= 1
    with pytest.raises(ValueError):
        split_dims(2, [1, 1, 1])


def _oom_above(limit: int, monkeypatch) -> None:
    """Featurising more than `limit` rows at once raises torch.OutOfMemoryError."""
    real = featurizer_module.tangent_factors

    def limited(model, plan, x):
        if len(x) > limit:
            raise torch.OutOfMemoryError(f"{len(x)} rows")
        return real(model, plan, x)

    monkeypatch.setattr(featurizer_module, "tangent_factors", limited)


def test_auto_batch_size_halves_the_tile_on_out_of_memory(tmp_path, monkeypatch):
    """--batch-size auto: out of memory restarts the kernel with half the tile until it fits; same kernel."""
    model = MODELS["mlp"][0]()
    train, test = data("mlp", 9, 0), data("mlp", 4, 1)
    expected, _ = computed(tmp_path, model, KernelSpec("trace"), train, test)
    _oom_above(2, monkeypatch)
    got, attrs = computed(tmp_path, model, KernelSpec("trace"), train, test, batch_size=None)
    assert attrs["tile"] == 2 and attrs["oom_retries"] == 2  # 9 → 4 → 2 rows per tile
    for key in expected:
        assert rel(got[key], expected[key]) < 1e-12
    with pytest.raises(torch.OutOfMemoryError):  # an explicit batch size is not changed
        computed(tmp_path, model, KernelSpec("trace"), train, test, batch_size=4)


def test_cli_batch_size_option(tmp_path):
    from typer.testing import CliRunner

    from ntk_explain.cli import app

    np.savez(tmp_path / "train.npz", x=data("mlp", 5, 0).numpy(), y=np.arange(5) % 3)
    args = ["compute", "--model", "tests.models:mlp", "--train", str(tmp_path / "train.npz"), "--quiet"]
    for value, code in (("auto", 0), ("2", 0), ("0", 2), ("many", 2)):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / f"{value}.h5"), "--batch-size", value])
        assert result.exit_code == code, result.output


@pytest.mark.parametrize(
    ("dtype", "stored", "tolerance"), [("float16", np.float16, 2e-3), ("bfloat16", np.uint16, 2e-2)]
)
def test_half_precision_features(tmp_path, dtype, stored, tolerance):
    """--feature-dtype: features stored in 16 bits (bfloat16 as raw bits), kernels computed and stored in float32,
    close to the float32 features' kernel; attribute reads them back (D < N: the fit uses the features)."""
    from typer.testing import CliRunner

    from ntk_explain.cli import app

    for split, n in (("train", 20), ("test", 5)):
        np.savez(tmp_path / f"{split}.npz", x=data("mlp", n, 0).numpy(), y=np.arange(n) % 3)
    args = ["compute", "--model", "tests.models:mlp", "--train", str(tmp_path / "train.npz"), "--quiet"]
    args += ["--test", str(tmp_path / "test.npz"), "--kernel", "pseudo", "--projection", "gaussian", "--proj-dim", "8"]
    name = "kernel/pseudo-gaussian-8"
    runs = {}
    for storage in ("float32", dtype):
        runs[storage] = tmp_path / f"{storage}.h5"
        result = CliRunner().invoke(app, [*args, "--feature-dtype", storage, "--out", str(runs[storage])])
        assert result.exit_code == 0, result.output
    with h5py.File(runs["float32"]) as full, h5py.File(runs[dtype]) as half:
        assert half[name].attrs["feature_dtype"] == dtype and half[f"{name}/train_train"].dtype == np.float32
        assert half[f"{name}/features/train"].dtype == stored
        assert store.read_features(half[f"{name}/features/train"]).dtype == getattr(torch, dtype)
        for key in ("train_train", "test_train", "diag_train", "diag_test"):
            assert 0 < rel(half[f"{name}/{key}"][()], full[f"{name}/{key}"][()]) < tolerance
    result = CliRunner().invoke(app, ["attribute", str(runs[dtype]), "--quiet"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding"), [(3, 1, 1, 1), ((3, 2), (2, 1), (2, 1), (0, 2)), (2, 2, 1, 0)]
)
def test_conv_patches_are_unfold(kernel, stride, dilation, padding):
    """A factorised conv's site inputs a_s: the strided slices give `F.unfold`'s patches, in its order."""

    conv = torch.nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding)
    x = torch.randn(5, 3, 9, 10, dtype=torch.float64)
    expected = torch.nn.functional.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)
    assert torch.equal(patches(conv, x), expected)


@pytest.mark.parametrize(("kernel", "stride", "dilation", "padding"), [(3, 1, 1, 1), (3, 2, 2, 0), (2, 2, 1, 0)])
def test_conv1d_patches_are_those_of_a_conv2d_of_height_one(kernel, stride, dilation, padding):

    conv = torch.nn.Conv1d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding)
    x = torch.randn(5, 3, 10, dtype=torch.float64)
    unfolded = torch.nn.functional.unfold(x[:, :, None], (1, kernel), (1, dilation), (0, padding), (1, stride))
    assert torch.equal(patches(conv, x), unfolded.transpose(1, 2))

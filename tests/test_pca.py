"""Streaming PCA against sklearn on the same standardized data."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from pipeline.pca import PCAAccumulator, fit_pca, load_basis, save_basis
from pipeline.store.basis import PCABasis

D, C = 24, 8


def features(n=3000, seed=0):
    """Correlated features with a distinct spectrum, very different scales and a large offset."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, D)) * np.linspace(3.0, 0.2, D)
    mix = np.linalg.qr(rng.normal(size=(D, D)))[0]
    return (latent @ mix) * rng.uniform(0.01, 100, D) + rng.uniform(-1e3, 1e3, D)


def sklearn_reference(x):
    z = (x - x.mean(0)) / x.std(0)  # population std, like the accumulator
    return z, PCA(n_components=C, svd_solver="full").fit(z)


@pytest.fixture(scope="module")
def data():
    x = features()
    # two workers, each fed several uneven batches, then merged
    a, b = PCAAccumulator(D), PCAAccumulator(D)
    for part in np.array_split(x[:1700], 5):
        a.update(part)
    for part in np.array_split(x[1700:], 3):
        b.update(part.reshape(-1, 1, D))  # any leading shape
    return x, a.merge(b).to_basis(C)


def test_matches_sklearn_up_to_sign(data):
    x, basis = data
    z, ref = sklearn_reference(x)
    assert basis.components.shape == (C, D) and basis.components.dtype == np.float32
    np.testing.assert_allclose(basis.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(basis.std, x.std(0), rtol=1e-5)
    signs = np.sign(np.sum(basis.components * ref.components_, axis=1))
    np.testing.assert_allclose(basis.components * signs[:, None], ref.components_, atol=1e-4)
    n = len(x)  # sklearn's variances use ddof=1, ours are population variances
    np.testing.assert_allclose(basis.explained_variance, ref.explained_variance_ * (n - 1) / n, rtol=1e-5)
    assert np.all(np.diff(basis.explained_variance) <= 0)  # largest first
    # projection == sklearn transform (up to the same signs), and it is what the basis documents
    np.testing.assert_allclose(basis.project(x) * signs, ref.transform(z), rtol=1e-3, atol=2e-3)


def test_sign_convention_and_order_independence(data):
    x, basis = data
    rows = np.arange(C)
    assert np.all(basis.components[rows, np.abs(basis.components).argmax(1)] > 0)
    whole = PCAAccumulator(D).update(x[::-1]).to_basis(C)  # one batch, other order
    np.testing.assert_allclose(whole.components, basis.components, atol=1e-5)
    np.testing.assert_allclose(
        fit_pca(iter(np.array_split(x, 7)), C).explained_variance, basis.explained_variance, rtol=1e-6
    )


def test_constant_dimension_gets_unit_std():
    x = features(500, seed=1)
    x[:, 3] = 7.0
    basis = fit_pca([x], 4)
    assert basis.std[3] == 1.0 and np.all(basis.components[:, 3] == pytest.approx(0, abs=1e-6))
    assert np.isfinite(basis.project(x)).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        PCAAccumulator(D).to_basis(2)
    with pytest.raises(ValueError, match="merge"):
        PCAAccumulator(D).merge(PCAAccumulator(D + 1))
    with pytest.raises(ValueError, match="num_components"):
        fit_pca([features(100)], D + 1)


def test_save_load_round_trip(data, tmp_path):
    _, basis = data
    save_basis(basis, str(tmp_path / "a" / "basis.zarr"))
    save_basis(basis, f"file://{tmp_path}/b/basis.zarr")
    for url in (str(tmp_path / "a" / "basis.zarr"), f"file://{tmp_path}/b/basis.zarr"):
        loaded = load_basis(url)
        assert isinstance(loaded, PCABasis) and loaded.fingerprint == basis.fingerprint
        np.testing.assert_array_equal(loaded.components, basis.components)
    with pytest.raises(FileExistsError):
        save_basis(basis, str(tmp_path / "a" / "basis.zarr"))  # no silent overwrite
    save_basis(basis, str(tmp_path / "a" / "basis.zarr"), overwrite=True)


def test_load_basis_from_a_store_pca_group(data, tmp_path):
    import zarr

    _, basis = data
    store = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    basis.save(store.create_group("pca"))
    assert load_basis(str(tmp_path / "store.zarr")).fingerprint == basis.fingerprint

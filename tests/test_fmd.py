"""Fréchet Music Distance: every estimator against an independent float64 computation (1e-6 relative)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clamp2.search.fmd import (ESTIMATORS, FMDError, Gaussian, estimate_gaussian, fmd, fmd_inf, frechet_distance,
                        per_file_fmd, sample_sizes)
from conftest import load_script

RTOL = 1e-6


def sets(seed=0, n_ref=400, n_test=300, dim=24):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    ref = (rng.normal(size=(n_ref, dim)) @ mixing + 0.5).astype(np.float32)
    test = (rng.normal(size=(n_test, dim)) * 1.5 @ mixing + 0.8).astype(np.float32)
    return ref, test


# Independent float64 estimators, written from the estimators' definitions.

def mle(x):
    x = x.astype(np.float64)
    centred = x - x.sum(axis=0) / len(x)
    return x.sum(axis=0) / len(x), centred.T @ centred / (len(x) - 1)


def empirical(x):
    x = x.astype(np.float64)
    mean = x.sum(axis=0) / len(x)
    centred = x - mean
    return mean, centred, centred.T @ centred / len(x)


def shrunk(cov, shrinkage):
    p = len(cov)
    return (1 - shrinkage) * cov + shrinkage * np.trace(cov) / p * np.eye(p)


def ledoit_wolf(x):
    """Ledoit & Wolf (2004): shrinkage b²/d² towards (tr S / p) I."""
    mean, centred, cov = empirical(x)
    n, p = centred.shape
    m = np.trace(cov) / p
    d2 = np.sum((cov - m * np.eye(p)) ** 2) / p
    b2_bar = sum(np.sum((np.outer(row, row) - cov) ** 2) for row in centred) / n ** 2 / p
    return mean, shrunk(cov, min(b2_bar, d2) / d2)


def oas(x):
    """Chen et al. (2010) OAS as scikit-learn states it (the 2/p terms of their Eq. 23 dropped)."""
    mean, centred, cov = empirical(x)
    n, p = centred.shape
    tr, tr_sq = np.trace(cov), np.sum(cov * cov)
    return mean, shrunk(cov, min((tr_sq + tr ** 2) / ((n + 1) * (tr_sq - tr ** 2 / p)), 1.0))


def bootstrap(x, samples, seed):
    rng = np.random.default_rng(seed)
    means, covs = [], []
    for _ in range(samples):
        mean, cov = mle(x[rng.choice(len(x), size=len(x), replace=True)])
        means.append(mean)
        covs.append(cov)
    return np.mean(means, axis=0), np.mean(covs, axis=0)


def independent_estimate(x, estimator):
    if estimator == "mle":
        return mle(x)
    if estimator == "ledoit_wolf":
        return ledoit_wolf(x)
    if estimator == "oas":
        return oas(x)
    if estimator == "shrinkage":
        mean, _, cov = empirical(x)
        return mean, shrunk(cov, 0.1)
    return bootstrap(x, 1000, 0)


def trace_sqrt_product(cov_t, cov_r):
    """Tr sqrtm(S_t S_r) = sum of sqrt(eigenvalues of S_r^1/2 S_t S_r^1/2) (symmetric PSD): no sqrtm."""
    values, vectors = np.linalg.eigh(cov_r)
    root_r = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_r @ cov_t @ root_r), 0, None)))


def independent_fmd(mean_r, cov_r, mean_t, cov_t, offset=0.0):
    eye = np.eye(len(cov_r)) * offset
    diff = mean_r - mean_t
    return diff @ diff + np.trace(cov_r) + np.trace(cov_t) - 2 * trace_sqrt_product(cov_t + eye, cov_r + eye)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_matches_an_independent_float64_computation(estimator):
    ref, test = sets()
    for features in (ref, test):
        got = estimate_gaussian(features, estimator)
        mean, cov = independent_estimate(features, estimator)
        assert got.mean.dtype == got.cov.dtype == np.float64
        np.testing.assert_allclose(got.mean, mean, rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(got.cov, cov, rtol=RTOL, atol=1e-12 * np.abs(cov).max())
    expected = independent_fmd(*independent_estimate(ref, estimator), *independent_estimate(test, estimator))
    assert fmd(ref, test, estimator) == pytest.approx(expected, rel=RTOL)
    assert expected > 1.0  # a distance well away from 0, so the relative test means something


def test_mle_is_numpy_cov_and_fmd_of_a_set_with_itself_is_zero():
    ref, _ = sets()
    gaussian = estimate_gaussian(ref)
    assert np.array_equal(gaussian.cov, np.cov(ref.astype(np.float64), rowvar=False))
    assert abs(frechet_distance(gaussian, gaussian)) < 1e-8


def test_bootstrap_in_closed_form_equals_the_resampling_loop():
    ref, _ = sets(n_ref=60, dim=5)
    got = estimate_gaussian(ref, "bootstrap", seed=7, bootstrap_samples=130)
    mean, cov = bootstrap(ref, 130, 7)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(got.cov, cov, rtol=1e-9)
    again = estimate_gaussian(ref, "bootstrap", seed=7, bootstrap_samples=130)
    assert np.array_equal(again.cov, got.cov)  # seeded


def test_a_constant_dimension_adds_no_offset_as_in_the_published_fmd():
    """SciPy warns that the product is singular but its root is finite: the published FMD, which tests only
    that the root is finite, adds nothing (3.8311 here; with the offset 3.8301), whichever set is first."""
    ref, test = sets(n_ref=50, n_test=60, dim=10)
    ref[:, 3] = 1.0  # a constant dimension: the covariance product is singular
    messages = []
    got = fmd(ref, test, on_singular=messages.append)
    assert not messages
    expected = independent_fmd(*mle(ref), *mle(test))
    assert got == pytest.approx(expected, rel=RTOL)
    assert fmd(test, ref) == pytest.approx(expected, rel=RTOL)


def test_a_non_finite_root_adds_the_offset_to_both_diagonals(monkeypatch):
    import scipy.linalg

    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def sqrtm(matrix):  # the first root is not finite, as SciPy gives for some singular products
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    ref, test = sets(n_ref=50, n_test=60, dim=10)
    messages = []
    got = fmd(ref, test, on_singular=messages.append)
    assert len(calls) == 2 and messages and "singular" in messages[0]
    expected = independent_fmd(*mle(ref), *mle(test), offset=1e-6)
    assert got == pytest.approx(expected, rel=RTOL)


def test_a_non_negligible_imaginary_root_is_an_error():
    gaussian = Gaussian(np.zeros(3), np.eye(3))
    with pytest.raises(FMDError, match="imaginary"):
        frechet_distance(gaussian, Gaussian(np.zeros(3), -np.eye(3)))
    with pytest.raises(FMDError, match="at least 2"):
        estimate_gaussian(np.ones((1, 3)))
    with pytest.raises(FMDError, match="different dimensions"):
        frechet_distance(gaussian, Gaussian(np.zeros(2), np.eye(2)))


def test_fmd_inf_is_the_intercept_of_a_fit_against_one_over_n():
    ref, test = sets(n_test=700)
    reference = estimate_gaussian(ref, "oas")
    result = fmd_inf(reference, test, steps=6, min_n=100, seed=3)
    rng = np.random.default_rng(3)
    sizes = sample_sizes(100, 700, 6)
    assert sizes == [100, 220, 340, 460, 580, 700]
    ys = np.array([independent_fmd(reference.mean, reference.cov, *mle(test[rng.choice(700, size=n, replace=True)]))
                   for n in sizes])
    design = np.stack([1 / np.array(sizes), np.ones(len(sizes))], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, ys, rcond=None)
    r2 = 1 - np.sum((ys - design @ [slope, intercept]) ** 2) / np.sum((ys - ys.mean()) ** 2)
    assert [n for n, _ in result.points] == sizes
    np.testing.assert_allclose([y for _, y in result.points], ys, rtol=RTOL)
    assert (result.score, result.slope, result.r2) == pytest.approx((intercept, slope, r2), rel=RTOL)
    with pytest.raises(FMDError, match="min_n"):
        fmd_inf(reference, test, min_n=700)


def test_per_file_distance_uses_the_vector_as_mean_and_the_reference_covariance():
    ref, test = sets()
    reference = estimate_gaussian(ref)
    got = per_file_fmd(reference, test[:5])
    for row, value in zip(test[:5], got):
        expected = independent_fmd(reference.mean, reference.cov, row.astype(np.float64), reference.cov)
        assert value == pytest.approx(expected, rel=RTOL, abs=1e-9)
        assert value == pytest.approx(frechet_distance(reference, Gaussian(row.astype(np.float64), reference.cov)),
                                      rel=1e-9)


def write_folder(folder, matrix, prefix="f"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(matrix):
        np.save(folder / f"{prefix}{i:04d}.npy", row[None])
    return folder


def test_script_prints_fmd_inf_and_per_file(tmp_path, capsys):
    ref, test = sets(n_ref=120, n_test=90, dim=12)
    rdir, tdir = write_folder(tmp_path / "r", ref), write_folder(tmp_path / "t", test, prefix="t")
    script = load_script("semantic_search/clamp2_fmd.py")
    assert script.main([str(rdir), str(tdir), "--estimator", "ledoit_wolf", "--inf", "--steps", "4", "--min_n", "20",
                        "--per_file", str(tmp_path / "per_file.jsonl"), "--no_progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    reference = estimate_gaussian(ref, "ledoit_wolf")
    assert out[0] == (f"FMD (ledoit_wolf) between '{rdir}' and '{tdir}': "
                      f"{frechet_distance(reference, estimate_gaussian(test, 'ledoit_wolf')):.4f}")
    inf = fmd_inf(reference, test, steps=4, min_n=20, seed=0)
    assert out[1].startswith(f"FMD-inf (ledoit_wolf reference) between '{rdir}' and '{tdir}': {inf.score:.4f} "
                             f"(R^2 {inf.r2:.4f}")
    lines = [json.loads(x) for x in (tmp_path / "per_file.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == [f"t{i:04d}" for i in range(90)]
    np.testing.assert_allclose([x["fmd"] for x in lines], per_file_fmd(reference, test), rtol=1e-12)
    # Too few vectors for FMD-inf's sample sizes is a usage error.
    assert script.main([str(rdir), str(tdir), "--inf", "--no_progress"]) == 2
    assert "--min_n" in capsys.readouterr().err


def test_script_prints_no_negative_distance_for_identical_sets(tmp_path, capsys):
    """Identical sets give -1e-5 from sqrtm's rounding: printed as 0.0000, never -0.0000, whatever the file order."""
    features = np.random.default_rng(0).normal(size=(10, 100)).astype(np.float32)
    assert fmd(features, features) < 0  # the rounding this is about
    rdir, tdir = write_folder(tmp_path / "r", features), write_folder(tmp_path / "t", features[::-1], prefix="t")
    script = load_script("semantic_search/clamp2_fmd.py")
    for first, second in ((rdir, tdir), (tdir, rdir), (rdir, rdir)):
        assert script.main([str(first), str(second), "--no_progress"]) == 0
        assert capsys.readouterr().out == f"FMD (mle) between '{first}' and '{second}': 0.0000\n"

"""Fréchet Music Distance (FMD) between two sets of global features, as the published FMD defines it.

Each set is summarised by a Gaussian (mean, covariance) in float64, then

    FMD = ||mu_r - mu_t||^2 + Tr(S_r) + Tr(S_t) - 2 Tr(sqrtm(S_t S_r))

with ``scipy.linalg.sqrtm``. When the root is not finite (the published FMD's only test of a singular
product; SciPy's "singular" warning alone is not one) 1e-6 is added to both diagonals and the root
recomputed; a complex root whose diagonal's imaginary part is negligible (``allclose(imag, 0,
atol=1e-3)``) is replaced by its real part, any other is an error. Covariance estimators
(``ESTIMATORS``): ``mle`` (``np.cov(rowvar=False)``, the default), ``ledoit_wolf``, ``oas``, ``shrinkage`` (scikit-learn's ``LedoitWolf``, ``OAS``,
``ShrunkCovariance(shrinkage=0.1)``, all with ``assume_centered=False``) and ``bootstrap`` (the
averages of the mean and ``np.cov`` over 1,000 seeded resamples with replacement, computed in
closed form from the resample counts: one weighted product instead of 1,000 covariances).

FMD-inf (``fmd_inf``) extrapolates to an infinite test set: ``steps`` sample sizes evenly spaced
from ``min_n`` to N (``int(np.linspace(...))``), a sample of each size drawn with replacement from
the test set (seeded), its FMD with the maximum-likelihood estimate against the reference's, and a
linear fit of FMD against 1/n whose intercept is FMD-inf (R² of the fit reported).

Per file (``per_file_fmd``): each test vector as the mean and the reference covariance as both
covariances, so its distance is ``||x - mu_r||^2`` plus one constant computed once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

ESTIMATORS = ("mle", "ledoit_wolf", "oas", "shrinkage", "bootstrap")
SHRINKAGE = 0.1
BOOTSTRAP_SAMPLES = 1000
SINGULAR_OFFSET = 1e-6
IMAGINARY_TOLERANCE = 1e-3
# Resamples whose counts are held at once by the closed-form bootstrap (memory: this x N int64).
BOOTSTRAP_BLOCK = 64


class FMDError(ValueError):
    """The distance cannot be computed (too few vectors, a non-negligible imaginary root, ...)."""


@dataclass(frozen=True)
class Gaussian:
    mean: np.ndarray  # float64 [D]
    cov: np.ndarray  # float64 [D, D]


@dataclass(frozen=True)
class FMDInfResult:
    score: float  # the intercept: FMD extrapolated to an infinite test set
    slope: float
    r2: float
    points: list[tuple[int, float]]  # (sample size, FMD)


def _as_float64(features: np.ndarray, what: str = "features") -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise FMDError(f"{what}: expected a [N, D] matrix, got shape {features.shape}")
    if len(features) < 2:
        raise FMDError(f"{what}: a covariance needs at least 2 vectors, got {len(features)}")
    return features


def _bootstrap(features: np.ndarray, samples: int, seed: int) -> Gaussian:
    """Mean over ``samples`` resamples of (mean, np.cov), from the resample counts.

    With counts w_b (each sums to N) a resample's mean is ``w_b X / N`` and its covariance
    ``(X' diag(w_b) X - N m_b m_b') / (N - 1)``, so the averages need one product with the mean
    counts and the means' second moment. X is centred first so the difference loses no precision.
    """
    n = len(features)
    centre = features.mean(axis=0)
    centred = features - centre
    rng = np.random.default_rng(seed)
    weight_sum = np.zeros(n)
    mean_sum = np.zeros(features.shape[1])
    second_moment = np.zeros((features.shape[1], features.shape[1]))
    for start in range(0, samples, BOOTSTRAP_BLOCK):
        block = min(BOOTSTRAP_BLOCK, samples - start)
        counts = np.stack([np.bincount(rng.choice(n, size=n, replace=True), minlength=n) for _ in range(block)])
        means = counts @ centred / n
        weight_sum += counts.sum(axis=0)
        mean_sum += means.sum(axis=0)
        second_moment += means.T @ means
    mean_weights = weight_sum / samples
    cov = ((centred * mean_weights[:, None]).T @ centred - n * second_moment / samples) / (n - 1)
    return Gaussian(mean_sum / samples + centre, (cov + cov.T) / 2)


def estimate_gaussian(features: np.ndarray, estimator: str = "mle", *, seed: int = 0,
                      bootstrap_samples: int = BOOTSTRAP_SAMPLES) -> Gaussian:
    """Mean and covariance (float64) of ``[N, D]`` features with one of ``ESTIMATORS``."""
    features = _as_float64(features)
    if estimator == "mle":
        return Gaussian(features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False)))
    if estimator == "bootstrap":
        return _bootstrap(features, bootstrap_samples, seed)
    from sklearn.covariance import OAS, LedoitWolf, ShrunkCovariance

    models: dict[str, Callable] = {
        "ledoit_wolf": lambda: LedoitWolf(assume_centered=False),
        "oas": lambda: OAS(assume_centered=False),
        "shrinkage": lambda: ShrunkCovariance(assume_centered=False, shrinkage=SHRINKAGE),
    }
    if estimator not in models:
        raise FMDError(f"unknown estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
    fitted = models[estimator]().fit(features)
    return Gaussian(np.asarray(fitted.location_, dtype=np.float64), np.asarray(fitted.covariance_, dtype=np.float64))


def _sqrtm(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """``scipy.linalg.sqrtm`` and whether its root is not finite: the published FMD's test of a singular
    product (it calls ``sqrtm(..., disp=False)`` and acts on nothing else). SciPy's LinAlgWarning
    ("singular" or "ill-conditioned") comes with finite roots equal to the published ones, so it is
    silenced, not acted on: a constant dimension must not move the distance."""
    import scipy.linalg

    if not np.all(np.isfinite(matrix)):
        # SciPy before 1.16 refuses a non-finite matrix (ValueError "array must not contain infs or NaNs");
        # 1.16 and later return a non-finite root. Either way it is the non-finite root the caller acts on.
        return matrix, True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(matrix)
    return root, not np.all(np.isfinite(root))


def frechet_distance(reference: Gaussian, test: Gaussian, *,
                     on_singular: Optional[Callable[[str], None]] = None) -> float:
    """The Fréchet distance of two Gaussians, with the published FMD's handling of singular products."""
    mu_r, mu_t = np.atleast_1d(reference.mean), np.atleast_1d(test.mean)
    s_r, s_t = np.atleast_2d(reference.cov), np.atleast_2d(test.cov)
    if mu_r.shape != mu_t.shape or s_r.shape != s_t.shape:
        raise FMDError(f"the two sets have different dimensions ({mu_r.shape[0]} and {mu_t.shape[0]})")
    root, singular = _sqrtm(s_t.dot(s_r))
    if singular:
        if on_singular is not None:
            on_singular(f"FMD: the covariance product is singular; adding {SINGULAR_OFFSET} to both diagonals")
        offset = np.eye(s_t.shape[0]) * SINGULAR_OFFSET
        root, _ = _sqrtm((s_t + offset).dot(s_r + offset))
        if not np.all(np.isfinite(root)):
            raise FMDError("FMD: the matrix square root is not finite even with the diagonal offset")
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=IMAGINARY_TOLERANCE):
            raise FMDError(f"FMD: the matrix square root has a non-negligible imaginary part "
                           f"(max {np.max(np.abs(root.imag)):.3g}); the covariances are not usable")
        root = root.real
    diff = mu_t - mu_r
    return float(diff.dot(diff) + np.trace(s_t) + np.trace(s_r) - 2 * np.trace(root))


def fmd(reference_features: np.ndarray, test_features: np.ndarray, estimator: str = "mle", *, seed: int = 0,
        on_singular: Optional[Callable[[str], None]] = None) -> float:
    """FMD between two ``[N, D]`` feature sets."""
    reference = estimate_gaussian(reference_features, estimator, seed=seed)
    test = estimate_gaussian(test_features, estimator, seed=seed)
    return frechet_distance(reference, test, on_singular=on_singular)


def sample_sizes(min_n: int, max_n: int, steps: int) -> list[int]:
    return [int(n) for n in np.linspace(min_n, max_n, steps)]


def check_inf_arguments(steps: int, min_n: int, max_n: int) -> None:
    """FMD-inf needs 2 <= min_n < N (the published FMD asserts min_n < N) and at least 2 sizes."""
    if not 2 <= min_n < max_n:
        raise FMDError(f"FMD-inf: --min_n must be at least 2 and below the number of test vectors ({max_n}), "
                       f"got {min_n}")
    if steps < 2:
        raise FMDError(f"FMD-inf: --steps must be at least 2, got {steps}")


def fmd_inf(reference: Gaussian, test_features: np.ndarray, *, steps: int = 25, min_n: int = 500, seed: int = 0,
            on_singular: Optional[Callable[[str], None]] = None,
            progress: Optional[Callable[[int], None]] = None) -> FMDInfResult:
    """FMD-inf: intercept of the linear fit of FMD(sample of size n) against 1/n."""
    test_features = _as_float64(test_features, "test features")
    max_n = len(test_features)
    check_inf_arguments(steps, min_n, max_n)
    rng = np.random.default_rng(seed)
    points = []
    for n in sample_sizes(min_n, max_n, steps):
        sample = test_features[rng.choice(max_n, size=n, replace=True)]
        points.append((n, frechet_distance(reference, estimate_gaussian(sample, "mle"), on_singular=on_singular)))
        if progress is not None:
            progress(1)
    xs = 1.0 / np.array([n for n, _ in points], dtype=np.float64)
    ys = np.array([y for _, y in points])
    slope, intercept = np.polyfit(xs, ys, 1)
    total = np.sum((ys - ys.mean()) ** 2)
    r2 = 1.0 - np.sum((ys - (slope * xs + intercept)) ** 2) / total if total > 0 else 1.0
    return FMDInfResult(float(intercept), float(slope), float(r2), points)


def per_file_fmd(reference: Gaussian, test_features: np.ndarray, *,
                 on_singular: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """Each test vector's FMD to the reference: its vector as the mean, the reference covariance as both.

    The covariance terms are the same for every file, so they are computed once (with the published
    handling of a singular product) and added to each squared distance.
    """
    constant = frechet_distance(reference, Gaussian(reference.mean, reference.cov), on_singular=on_singular)
    out = np.empty(len(test_features))
    for start in range(0, len(test_features), 8192):
        diff = np.asarray(test_features[start:start + 8192], dtype=np.float64) - reference.mean
        out[start:start + 8192] = np.einsum("ij,ij->i", diff, diff) + constant
    return out

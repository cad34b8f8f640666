"""Automatic regularisation per scan: the Tikhonov lambda of row-separable SENSE, chosen from the
scan's own data (numpy only, no stream knowledge).

After the inverse FFT along the readout, SENSE splits into one small problem per readout position
(gadgets/numerics/sense.py). For a sample of those rows, the normal matrix N = A^H A is built
exactly (N[i, j] = G[i, j] P[i - j]: the coil Gram matrix of the maps at the two positions times
the ky mask's point-spread function) and eigen-decomposed once; then every lambda of a grid costs
a few vector operations: with N = V diag(l) V^H and g = |V^H A^H y|^2,

    residual(mu) = ||y||^2 - sum g (l + 2 mu) / (l + mu)^2        ||A x_mu - y||^2
    fit(mu)      = sum g l / (l + mu)^2                           ||A x_mu||^2
    trace(mu)    = sum l / (l + mu)                               GCV's effective parameters
    gcv(mu)      = residual / (data - trace)^2

mu = lam * max diag(N) (the solvers' meaning of lam, so the chosen lam goes straight to them).

The rule (measured on the `pisf evaluate` dev cases, PSNR against the fully sampled reference,
lambda on an eighth-decade grid; `pisf classical-table --lambda-study` measures it per case):
1. the corner of the curve (log residual, log fit) where it has one: the largest interior local
   maximum of its curvature. Where the data stop constraining the image, the fit grows with
   little change in residual; its corner sat within 0.3 dB of the per-case oracle on the
   in-vivo brain and the Cima.X sphere. The curve of the image norm (the textbook L-curve)
   chose 3-4x too small on the sphere (-2 to -3 dB);
2. where the curvature is largest at the smallest lambda (no corner: well-conditioned rows,
   e.g. an equispaced mask with a separate reference), generalised cross-validation, or the
   last positive local maximum of the curvature where that lies at a larger lambda (a shoulder:
   only the phantom R3 with an embedded centre had one, +1.2 dB over GCV there, 0.8 dB below
   its oracle; no other dev case moved).
Held-out reference lines (reconstruct without some, predict them) chose 5-10x too small on both
phantoms (-3 to -8 dB): the central lines are predicted well whatever the noise amplification.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fft import fftc, ifftc

LAMBDA_GRID = tuple(float(v) for v in 10 ** np.arange(-4.0, 0.01, 0.125))   # 1e-4 .. 1, eighth decades
# readout positions sampled for the curves (the rows are independent); one eigen-decomposition of
# (maps x ny)^2 per row dominates, so long rows take fewer: 256x256x8, one thread, loaded 2-core
# machine: 32 rows 1.9 s, 16 rows 0.9 s, the same lambda on all 20 dev cases with 256 lines;
# at 96-128 lines 16 rows moved 9 of 33 choices by one grid step (1/8 decade)
DEFAULT_ROWS = 32
LONG_ROWS = 16                # rows sampled when ny >= LONG_ROW_LINES
LONG_ROW_LINES = 192
CORNER_EDGE = 2             # grid points at either end excluded from the corner search


@dataclass
class LambdaChoice:
    """What `choose_lambda` chose and from what (curves over `grid`)."""
    lam: float
    rule: str                   # "corner" | "gcv" | "shoulder"
    grid: np.ndarray
    residual: np.ndarray        # ||A x - y||^2 over the sampled rows
    fit: np.ndarray             # ||A x||^2
    gcv: np.ndarray
    curvature: np.ndarray


@dataclass
class RowSpectra:
    """Eigen-decomposition of the normal equations of a sample of rows."""
    eigenvalues: np.ndarray     # [rows, n] (n = maps x ny unknowns per row), >= 0
    projections: np.ndarray     # [rows, n] |V^H A^H y|^2
    data_power: float           # ||y||^2 over the rows
    data_count: int             # measured complex samples over the rows
    diagonal_max: float         # max diag(A^H A) over all rows (the solvers' lambda scale)


def mask_psf(mask: np.ndarray) -> np.ndarray:
    """P [ny, ny] = F^H diag(mask) F for the centred orthonormal DFT along ky."""
    sampled = np.asarray(mask) > 0.5
    ny = sampled.shape[0]
    dft = fftc(np.eye(ny), axes=(0,))[sampled]                       # [m, ny]: sampled rows of F
    return dft.conj().T @ dft


def row_spectra(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray,
                rows: int | None = DEFAULT_ROWS) -> RowSpectra:
    """RowSpectra of `rows` readout positions spread over the slice (None: all; "auto": DEFAULT_ROWS,
    LONG_ROWS for ny >= LONG_ROW_LINES). hybrid [C, ny, nx]
    (ky, x; zeros off the mask), mask [ny], maps [C, ny, nx] or [M, C, ny, nx] (M maps: the
    unknowns of a row are the M images stacked)."""
    maps = np.asarray(maps, dtype=np.complex64)
    maps = maps[None] if maps.ndim == 3 else maps                     # [M, C, ny, nx]
    sets, coils, ny, nx = maps.shape
    sampled = (np.asarray(mask) > 0.5).astype(np.float32)
    if rows == "auto":
        rows = LONG_ROWS if ny >= LONG_ROW_LINES else DEFAULT_ROWS
    power = np.sum(np.abs(maps) ** 2, axis=(0, 1))                     # [ny, nx]
    diagonal_max = float(power.max()) * float(sampled.mean())          # sense_tikhonov's scale
    picks = np.arange(nx) if rows is None or rows >= nx else np.linspace(0, nx - 1, rows).round().astype(int)
    psf = np.tile(mask_psf(sampled), (sets, sets)).astype(np.complex64)             # [M ny, M ny]
    stacked = maps[..., picks].transpose(3, 1, 0, 2).reshape(picks.size, coils, sets * ny)   # [r, C, M ny]
    normal = np.einsum("rci,rcj->rij", stacked.conj(), stacked, optimize=True) * psf[None]
    data = np.asarray(hybrid, dtype=np.complex64)[..., picks] * sampled[None, :, None]     # [C, ny, r]
    images = ifftc(data, axes=(1,)).transpose(2, 0, 1)                                      # [r, C, ny]
    adjoint = np.einsum("rci,rci->ri", stacked.conj(), np.tile(images, (1, 1, sets)))      # [r, M ny]
    eigenvalues, vectors = np.linalg.eigh(normal)
    projections = np.abs(np.einsum("rij,ri->rj", vectors.conj(), adjoint)) ** 2
    return RowSpectra(np.maximum(eigenvalues, 0.0), projections, float(np.sum(np.abs(data) ** 2)),
                      int(coils * sampled.sum() * picks.size), diagonal_max)


def tikhonov_curves(spectra: RowSpectra, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual, fit, gcv) over lambda `grid` (solver meaning: mu = lam * diagonal_max)."""
    mus = np.asarray(grid, dtype=np.float64)[:, None, None] * max(spectra.diagonal_max, 1e-30)
    eig = spectra.eigenvalues.astype(np.float64)[None]
    proj = spectra.projections.astype(np.float64)[None]
    shrink = 1.0 / (eig + mus) ** 2
    residual = spectra.data_power - np.sum(proj * (eig + 2 * mus) * shrink, axis=(1, 2))
    fit = np.sum(proj * eig * shrink, axis=(1, 2))
    trace = np.sum(eig / (eig + mus), axis=(1, 2))
    residual = np.maximum(residual, 1e-30 * max(spectra.data_power, 1e-30))
    gcv = residual / np.maximum(spectra.data_count - trace, 1e-9) ** 2
    return residual, fit, gcv


def curvature(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed curvature of the parametric curve (x(t), y(t)) sampled at unit steps of t."""
    dx, dy = np.gradient(x), np.gradient(y)
    ddx, ddy = np.gradient(dx), np.gradient(dy)
    speed = np.maximum((dx * dx + dy * dy) ** 1.5, 1e-300)        # a flat curve (no data) bends nowhere
    return np.nan_to_num((dx * ddy - ddx * dy) / speed)


def corner_index(bend: np.ndarray, edge: int = CORNER_EDGE) -> int | None:
    """Index of the curvature's maximum when it lies inside the grid (not within `edge` points of
    either end) and is positive; else None. A curve that bends most at the smallest lambda has no
    corner: a small bump on its falling curvature moved with the sampled rows (sphere R3: 0.0056
    with 32 rows, none with 128)."""
    inner = bend[edge:bend.size - edge]
    i = int(np.argmax(inner)) + edge
    if inner[i - edge] <= 0 or i in (edge, bend.size - edge - 1):
        return None
    return i


def shoulder_index(bend: np.ndarray, edge: int = CORNER_EDGE) -> int | None:
    """Index of the last (largest-lambda) positive interior local maximum of `bend`, or None: a
    corner that a larger bend at the smallest lambda hides."""
    peaks = [i for i in range(edge + 1, bend.size - edge - 1)
             if bend[i] > 0 and bend[i] >= bend[i - 1] and bend[i] > bend[i + 1]]
    return peaks[-1] if peaks else None


def choose_lambda(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray, grid=LAMBDA_GRID,
                  rows: int | str | None = "auto") -> LambdaChoice:
    """The Tikhonov lam for `sense_tikhonov(hybrid, mask, maps, lam)` by the module's rule."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 * CORNER_EDGE + 3 or np.any(grid <= 0) or np.any(np.diff(grid) <= 0):
        raise ValueError(f"lambda grid must be increasing, positive and have at least {2 * CORNER_EDGE + 3} values")
    spectra = row_spectra(hybrid, mask, maps, rows)
    residual, fit, gcv = tikhonov_curves(spectra, grid)
    bend = curvature(np.log(residual), np.log(np.maximum(fit, 1e-300)))
    corner = corner_index(bend)
    if corner is not None:
        return LambdaChoice(float(grid[corner]), "corner", grid, residual, fit, gcv, bend)
    best, shoulder = int(np.argmin(gcv)), shoulder_index(bend)
    if shoulder is not None and shoulder > best:
        return LambdaChoice(float(grid[shoulder]), "shoulder", grid, residual, fit, gcv, bend)
    return LambdaChoice(float(grid[best]), "gcv", grid, residual, fit, gcv, bend)

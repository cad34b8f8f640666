"""GRAPPA for 1D (ky) undersampling, calibrated on the reference lines, applied in hybrid space.

Numpy only, no stream knowledge. Works with any 1D line pattern (equispaced, random, partial
Fourier, reference lines embedded or separate): every missing line is synthesised from the
nearest measured lines on each side (up to `ky_sources` per side, like Gadgetron's kE1 = 4 in
all) and `kx_taps` neighbouring readout samples (Gadgetron's kRO = 5), with one kernel per
distinct source geometry (the offsets of its source lines), as in arbitrary-pattern GRAPPA.

Calibration (fast, one pass over the reference block for every geometry):
1. the block's kernel correlations Corr[c1, c2](dy, dx) = sum conj(R_c1[t, k]) R_c2[t + dy, k + dx]
   for every ky lag of the block and every kx lag a kernel spans: an FFT along ky (zero-padded,
   so no wrap) and one coil-by-coil product per kx lag;
2. per geometry, the normal equations of the kernel fit (sources x sources, sources x targets)
   are read off those correlations (the stationary approximation of the patch Gram matrix: each
   lag is summed over every position where both samples lie in the block) and solved with
   Tikhonov regularisation relative to the mean source energy.
Application (row by row): after the inverse FFT along the fully sampled readout, a kernel's kx
taps become one complex weight per readout position x, so each row x is an independent 1D
problem along ky: target[c, ky, x] = sum over sources W_x[c, source] H[source coil, ky + dy, x].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fft import ifftc
from .reference import MIN_GRAPPA_REFERENCE_LINES

DEFAULT_KY_SOURCES = 2        # per side
DEFAULT_KX_TAPS = 5
DEFAULT_LAMBDA = 1e-3         # relative to the mean diagonal of the source Gram matrix


@dataclass
class GrappaFill:
    """What `grappa_fill` did: the filled hybrid data and how."""
    hybrid: np.ndarray            # complex64 [C, ny, nx]: measured + synthesised lines (ky, x)
    synthesised: np.ndarray       # bool [ny]: lines synthesised
    geometries: int               # distinct kernels calibrated


def kernel_correlations(block: np.ndarray, max_dx: int) -> np.ndarray:
    """Corr [2L, 2 max_dx + 1, C, C] of the reference block [C, L, nx]: entry [dy, dx + max_dx,
    c1, c2] = sum over t, k (both samples inside the block) of conj(R[c1, t, k]) R[c2, t + dy, k + dx];
    negative dy at index 2L + dy."""
    coils, lines, nx = block.shape
    spectra = np.fft.fft(block.astype(np.complex128), n=2 * lines, axis=1)      # [C, 2L, nx]
    out = np.empty((2 * lines, 2 * max_dx + 1, coils, coils), dtype=np.complex128)
    for dx in range(-max_dx, max_dx + 1):
        a = spectra[:, :, max(0, -dx):nx - max(0, dx)]
        b = spectra[:, :, max(0, dx):nx - max(0, -dx)]
        cross = np.einsum("afk,bfk->fab", a.conj(), b, optimize=True)           # [2L, C, C]
        out[:, dx + max_dx] = np.fft.ifft(cross, axis=0)
    return out


def source_offsets(sampled: np.ndarray, ky: int, per_side: int, max_span: int,
                   max_one_sided: int | None = None) -> tuple[int, ...]:
    """Offsets (relative to ky) of the nearest sampled lines, up to `per_side` before and after,
    dropping the farthest until the kernel (sources and target) spans at most max_span + 1 lines.
    A line with measured lines on one side only (the edge of k-space, a partial-Fourier gap) is
    synthesised only when its nearest source is at most `max_one_sided` lines away (none: no limit);
    otherwise () (the line stays unmeasured)."""
    before = [s - ky for s in range(ky - 1, -1, -1) if sampled[s]][:per_side]
    after = [s - ky for s in range(ky + 1, sampled.shape[0]) if sampled[s]][:per_side]
    if max_one_sided is not None and (not before or not after):
        nearest = [abs(o[0]) for o in (before, after) if o]
        if not nearest or nearest[0] > max_one_sided:
            return ()
    while before or after:
        span = (after[-1] if after else 0) - (before[-1] if before else 0)
        if span <= max_span:
            break
        if before and (not after or -before[-1] >= after[-1]):
            before.pop()
        else:
            after.pop()
    return tuple(sorted(before + after))


def solve_kernel(corr: np.ndarray, offsets: tuple[int, ...], max_dx: int, half_taps: int,
                 lam: float) -> np.ndarray:
    """Kernel W [sources (offset, dx, coil), C target coils] of one geometry from the block's
    correlations (normal equations, Tikhonov lam x mean diagonal)."""
    lags_y = corr.shape[0]
    coils = corr.shape[2]
    o = np.asarray(offsets)
    dx = np.arange(-half_taps, half_taps + 1)
    dy_ss = (o[None, :] - o[:, None]) % lags_y                                   # [m, m]
    dx_ss = dx[None, :] - dx[:, None] + max_dx                                  # [t, t]
    gram = corr[dy_ss[:, None, :, None], dx_ss[None, :, None, :]]                # [m, t, m, t, C, C]
    gram = gram.transpose(0, 1, 4, 2, 3, 5).reshape(o.size * dx.size * coils, -1)
    cross = corr[(-o % lags_y)[:, None], (-dx + max_dx)[None, :]]               # [m, t, C, C]
    cross = cross.reshape(-1, coils)
    weight = lam * max(float(np.real(np.trace(gram))) / gram.shape[0], 1e-30)
    gram[np.diag_indices_from(gram)] += weight
    return np.linalg.solve(gram, cross)


def readout_phases(nx: int, half_taps: int) -> np.ndarray:
    """[taps, nx]: the hybrid-space factor of a kx shift, ifftc_x(K[k + dx]) = phase[dx] * ifftc_x(K)."""
    impulse = np.zeros((2 * half_taps + 1, nx), dtype=np.complex128)
    centre = nx // 2
    for i, dx in enumerate(range(-half_taps, half_taps + 1)):
        impulse[i, (centre - dx) % nx] = 1.0
    return ifftc(impulse, axes=(-1,)) / ifftc(np.eye(1, nx, centre, dtype=np.complex128), axes=(-1,))


def grappa_fill(kspace: np.ndarray, mask: np.ndarray, reference: np.ndarray,
                ky_sources: int = DEFAULT_KY_SOURCES, kx_taps: int = DEFAULT_KX_TAPS,
                lam: float = DEFAULT_LAMBDA) -> GrappaFill:
    """Synthesise the missing ky lines of kspace [C, ny, nx] (measured lines where mask [ny] is
    set) from kernels calibrated on the reference block [C, L, nx] (contiguous, fully sampled
    lines of the same coils and readout). Lines without any source within the kernel span stay
    zero, and so do lines with sources on one side only that lie farther from them than the
    pattern's widest spacing (the largest gap between measured lines): a partial-Fourier gap is
    left to the caller. Returns hybrid data (ky, x)."""
    kspace = np.asarray(kspace, dtype=np.complex64)
    sampled = np.asarray(mask) > 0.5
    coils, ny, nx = kspace.shape
    lines = reference.shape[1]
    if lines < MIN_GRAPPA_REFERENCE_LINES:
        raise ValueError(f"GRAPPA needs at least {MIN_GRAPPA_REFERENCE_LINES} contiguous reference lines, "
                         f"got {lines}")
    half = max(0, (min(kx_taps, nx) - 1) // 2)
    max_dx = 2 * half
    corr = kernel_correlations(np.asarray(reference), max_dx)
    max_span = lines - 2          # at least two target positions of every geometry in the block
    hybrid = ifftc(kspace * sampled[None, :, None], axes=(-1,)).astype(np.complex64)
    out = hybrid.copy()
    measured = np.flatnonzero(sampled)
    spacing = int(np.max(np.diff(measured))) if measured.size > 1 else 1
    groups: dict[tuple[int, ...], list[int]] = {}
    for ky in np.flatnonzero(~sampled):
        offsets = source_offsets(sampled, int(ky), ky_sources, max_span, max_one_sided=spacing)
        if offsets:
            groups.setdefault(offsets, []).append(int(ky))
    phases = readout_phases(nx, half).astype(np.complex64)                        # [t, nx]
    synthesised = np.zeros(ny, dtype=bool)
    for offsets, targets in groups.items():
        kernel = solve_kernel(corr, offsets, max_dx, half, lam)                  # [(m, t, C), C]
        kernel = kernel.reshape(len(offsets), 2 * half + 1, coils, coils).astype(np.complex64)
        per_row = np.einsum("mtsc,tx->xcms", kernel, phases, optimize=True)       # [nx, C, m, C]
        per_row = per_row.reshape(nx, coils, -1)
        rows = np.asarray(targets)[None, :] + np.asarray(offsets)[:, None]         # [m, n]
        sources = hybrid[:, rows, :].transpose(1, 0, 2, 3).reshape(-1, len(targets), nx)   # [(m, C), n, x]
        out[:, targets, :] = np.einsum("xcs,snx->cnx", per_row, sources, optimize=True)
        synthesised[targets] = True
    return GrappaFill(out, synthesised, len(groups))


# ----------------------------------------------------------------------------- geometry
# Where GRAPPA loses to SENSE by geometry, measured on the `pisf evaluate` dev cases (issue 18;
# README "Classical chains vs BART", PSNR GRAPPA - SENSE with its automatic lambda):
# - an irregular (random) mask: one kernel per gap geometry, each fitted on the same few reference
#   lines, with far sources (brain 16 ch -0.5 to +0.1 dB, Cima.X 16 ch -4 dB, phantom 8 ch -1 to -3);
# - an embedded centre block with a wide gap between the outer lines (the centre takes part of the
#   line budget: R 4 at 128 lines leaves a gap of 7): the kernels must unfold gap - 1 aliases and
#   need about 4 coils per line of gap (brain 16 ch gap 4 +1.1, gap 7 +0.4; Cima.X 16 ch gap 4
#   +0.2, gap 7 -4.9; phantom 8 ch gap 4 -2.3; 4 ch -2 to -3). SENSE keeps that centre as data;
# - a separate reference (the image lines alone are a pure equispaced mask, gap = R): GRAPPA won
#   every case with 8-16 coils (R 2-4: +0.3 to +5 dB); with 4 coils R 2-3 -0.2 to +4, and with 4
#   coils at R 4 (as many coils as the gap: the kernel inverts at its limit) brain -4.7, phantom
#   +1.7 (the sense core with two-map calibration): more coils than the gap, 1.25 per line; with the
#   few-coil 0.95 eigenvalue crop (numerics/calibration.py) SENSE beat GRAPPA at 4 coils R 3 (brain
#   +0.34 vs -5.22, phantom -0.11 vs -0.36 dB to tuned BART l2; runs/eval18_fix): 1.5 per line.
# An equispaced mask with an embedded centre has its commonest gap in 0.67-0.93 of the outer gaps
# (R 3-8), a random one in 0.12-0.33 (0.5 at R 5 with 7 outer lines).
REGULAR_FRACTION = 0.6        # share of the outer gaps equal to the commonest gap: a regular pattern
COILS_PER_GAP = {"embedded": 4.0, "separate": 1.5}


def outer_gaps(mask: np.ndarray) -> np.ndarray:
    """Gaps (in lines) between consecutive measured lines of mask [ny] outside its fully sampled
    centre run (the reference block of embedded ACS)."""
    from .reference import reference_run
    sampled = np.asarray(mask) > 0.5
    outer = sampled & ~reference_run(sampled)
    return np.diff(np.flatnonzero(outer))


def common_gap(mask: np.ndarray) -> tuple[int, float]:
    """(the commonest outer gap, the share of outer gaps equal to it); (1, 1.0) without outer lines."""
    gaps = outer_gaps(mask)
    if gaps.size == 0:
        return 1, 1.0
    counts = np.bincount(gaps)
    return int(np.argmax(counts)), float(counts.max()) / gaps.size


def is_regular(mask: np.ndarray) -> bool:
    """True when at least REGULAR_FRACTION of the outer gaps equal the commonest one (equispaced
    with or without a centre block; a random mask is not)."""
    return common_gap(mask)[1] >= REGULAR_FRACTION


def grappa_weakness(mask: np.ndarray, coils: int, reference_is_data: bool = True) -> str | None:
    """Why GRAPPA is expected to do worse than SENSE on this geometry (module notes above), or
    None. mask [ny]: the image lines; coils: the (virtual) coils the kernels use;
    reference_is_data: the reference lines are image lines (embedded ACS), not a separate scan."""
    gap, share = common_gap(mask)
    if share < REGULAR_FRACTION:
        return "irregular (random) line pattern: one kernel per gap geometry, each fitted on few lines"
    layout = "embedded" if reference_is_data else "separate"
    needed = COILS_PER_GAP[layout] * gap
    if coils < needed:
        return (f"{coils} coils for a gap of {gap} lines between the outer measured lines ({layout} reference): "
                f"the kernels want {needed:g}")
    return None

"""PISF v3 runtime (contract 3): the unrolled network with its data consistency in numpy and its
learned regularisers in one ONNX "regulariser bank" (models/CONTRACT.md, models/pisf_v3.py).

The same computation as models.pisf_sense.PisfSenseNet (complex64 here, real pairs there):
b = A^H y; two Tikhonov starts (N + lam s) x = b by init_cg CG steps from 0 (lam = init_lambda
and smooth_lambda, s = each row's mean diag(N)); then per block k: z = bank(image, starts, k)
and block_cg CG steps on (N + mu_k s) x = b + mu_k s z from z. N is applied through FFTs
(gadgets/numerics/sense_rows.RowSense), never as a matrix. No torch import here.
"""
from __future__ import annotations

import numpy as np

from .sense_rows import RowSense

EPS = np.float32(1e-12)           # as models.pisf_sense.unrolled_cg
BANK_INPUTS = ("image", "initial", "block")
BANK_OUTPUT = "proposal"
# metadata the runtime cannot do without (CONTRACT.md, contract 3)
REQUIRED_METADATA = ("init_lambda", "smooth_lambda", "block_mu", "blocks", "init_cg", "block_cg")


def power(vectors: np.ndarray) -> np.ndarray:
    """sum |v|^2 along ky per row, [rows, 1] float32."""
    return np.sum(vectors.real ** 2 + vectors.imag ** 2, axis=-1, keepdims=True)


def conjugate_gradient(operator: RowSense, shift: np.ndarray, rhs: np.ndarray, start: np.ndarray | None,
                       iterations: int, residual: np.ndarray | None = None) -> np.ndarray:
    """`iterations` CG steps on (N + shift I) x = rhs per row (shift [rows, 1]) from `start`
    (None: zero); `residual` rhs - (N + shift) start when the caller has it cheaper."""
    x = np.zeros_like(rhs) if start is None else start.copy()
    if residual is None:
        residual = rhs.copy() if start is None else rhs - (operator.normal(x) + shift * x)
    direction = residual.copy()
    energy = power(residual)
    for _ in range(iterations):
        curved = operator.normal(direction) + shift * direction
        curvature = np.sum(direction.real * curved.real + direction.imag * curved.imag, axis=-1, keepdims=True)
        alpha = energy / (curvature + EPS)
        x += alpha * direction
        residual -= alpha * curved
        new_energy = power(residual)
        direction = residual + (new_energy / (energy + EPS)) * direction
        energy = new_energy
    return x


def multi_shift_cg(operator: RowSense, shifts: tuple[np.ndarray, np.ndarray], rhs: np.ndarray,
                   iterations: int) -> list[np.ndarray]:
    """CG from zero on (N + shift I) x = rhs for two per-row shifts with ONE application of N per
    iteration: the shifted systems share the Krylov space of the first (seed), so the second's
    iterates follow from scalar recurrences (Jegerlehner 1996; van den Eshof and Sleijpen 2003).
    Equal to two `conjugate_gradient` runs in exact arithmetic."""
    seed, other = shifts
    delta = other - seed                                   # [rows, 1]
    x, x_other = np.zeros_like(rhs), np.zeros_like(rhs)
    residual = rhs.copy()
    direction, direction_other = rhs.copy(), rhs.copy()
    energy = power(residual)
    zeta_prev = zeta = np.ones_like(energy)
    alpha_prev, beta_prev = np.ones_like(energy), np.zeros_like(energy)
    for _ in range(iterations):
        curved = operator.normal(direction) + seed * direction
        curvature = np.sum(direction.real * curved.real + direction.imag * curved.imag, axis=-1, keepdims=True)
        alpha = energy / (curvature + EPS)
        denominator = alpha * beta_prev * (zeta_prev - zeta) + zeta_prev * alpha_prev * (1 + delta * alpha)
        zeta_next = zeta * zeta_prev * alpha_prev / denominator
        alpha_other = alpha * zeta_next / zeta
        x += alpha * direction
        x_other += alpha_other * direction_other
        residual -= alpha * curved
        new_energy = power(residual)
        beta = new_energy / (energy + EPS)
        beta_other = beta * (zeta_next / zeta) ** 2
        direction = residual + beta * direction
        direction_other = zeta_next * residual + beta_other * direction_other
        zeta_prev, zeta, alpha_prev, beta_prev, energy = zeta, zeta_next, alpha, beta, new_energy
    return [x, x_other]


def compress_rows(measured: np.ndarray, maps: np.ndarray, coils: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row coil compression: rotate each row's coils to the left singular vectors of its
    maps [C, ny] and keep the first `coils`. A unitary rotation leaves N and b unchanged; the
    dropped components carry the least map energy of that row. Off by default: on the 39 dev
    cases (v3, --no-bart) 16 -> 8 coils cost <= 0.03 dB, -> 6 <= 0.07 dB, -> 4 up to 2.2 dB, for
    0.87-1.05x the time per case (the regulariser bank, not the FFTs, dominates)."""
    u, _, _ = np.linalg.svd(maps, full_matrices=False)                 # [rows, C, C]
    rotation = np.conj(np.swapaxes(u[:, :, :coils], 1, 2)).astype(np.complex64)   # [rows, r, C]
    return rotation @ measured, rotation @ maps


def pairs(image: np.ndarray) -> np.ndarray:
    """complex [rows, ny] -> float32 [rows, 2, ny] (real, imaginary)."""
    return np.ascontiguousarray(np.stack([image.real, image.imag], axis=1), dtype=np.float32)


class UnrolledPisf:
    """Contract 3's unrolled network around an onnxruntime session of the regulariser bank."""

    def __init__(self, session, metadata: dict, threads: int = 1, multi_shift: bool = True, row_coils: int = 0,
                 init_cg: int | None = None, block_cg: int | None = None):
        """row_coils > 0: per-row coil compression (see `compress_rows`) to that many coils.
        init_cg, block_cg: CG steps of the Tikhonov starts and of each block's data consistency
        (None: the trained counts in the metadata). More steps at run time solve each data
        consistency more exactly than in training; `pisf evaluate` measures what that does."""
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing:
            raise ValueError(f"contract-3 model lacks metadata {missing} (models/CONTRACT.md)")
        self.session = session
        self.lambdas = (np.float32(metadata["init_lambda"]), np.float32(metadata["smooth_lambda"]))
        self.mus = [np.float32(v) for v in str(metadata["block_mu"]).split(",")]
        self.blocks = int(metadata["blocks"])
        if len(self.mus) != self.blocks:
            raise ValueError(f"contract-3 model has {self.blocks} blocks but {len(self.mus)} block_mu values")
        self.init_cg = int(metadata["init_cg"] if init_cg is None else init_cg)
        self.block_cg = int(metadata["block_cg"] if block_cg is None else block_cg)
        if self.init_cg < 1 or self.block_cg < 0 or int(row_coils) < 0:
            raise ValueError(f"init_cg must be >= 1, block_cg and row_coils >= 0; got init_cg {self.init_cg}, "
                             f"block_cg {self.block_cg}, row_coils {row_coils}")
        self.threads = threads
        self.multi_shift = multi_shift
        self.row_coils = row_coils

    def starts(self, operator: RowSense, rhs: np.ndarray, scale: np.ndarray) -> list[np.ndarray]:
        """The two Tikhonov starts (sharp, smooth)."""
        shifts = (self.lambdas[0] * scale, self.lambdas[1] * scale)
        if self.multi_shift:
            # the seed is the smaller shift (the slower-converging system)
            order = (0, 1) if self.lambdas[0] <= self.lambdas[1] else (1, 0)
            solved = multi_shift_cg(operator, (shifts[order[0]], shifts[order[1]]), rhs, self.init_cg)
            return [solved[order.index(0)], solved[order.index(1)]]
        return [conjugate_gradient(operator, shift, rhs, None, self.init_cg) for shift in shifts]

    def run(self, measured: np.ndarray, mask: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """Image rows [rows, ny] (complex64) from measured rows [rows, C, ny] (normalised hybrid
        data), mask [ny] or [rows, ny] and maps [rows, C, ny]."""
        if 0 < self.row_coils < maps.shape[1]:
            measured, maps = compress_rows(measured, maps, self.row_coils)
        operator = RowSense(maps, mask, self.threads)
        rhs = operator.adjoint(measured)
        scale = operator.mean_diagonal()
        starts = self.starts(operator, rhs, scale)
        image = starts[0]
        initial = np.concatenate([pairs(starts[0]), pairs(starts[1])], axis=1)
        for k, mu in enumerate(self.mus):
            proposal = self.session.run([BANK_OUTPUT], {"image": pairs(image), "initial": initial,
                                                        "block": np.array(k, dtype=np.int64)})[0]
            z = (proposal[:, 0] + 1j * proposal[:, 1]).astype(np.complex64)
            shift = mu * scale
            # rhs + shift z - (N + shift) z = rhs - N z: the shift terms cancel exactly
            image = conjugate_gradient(operator, shift, rhs + shift * z, z, self.block_cg,
                                       residual=rhs - operator.normal(z))
        return image

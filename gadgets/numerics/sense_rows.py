"""The row-separable SENSE operator through FFTs along ky (numpy; scipy.fft when installed).

After the inverse FFT along the fully sampled readout, y_c = M F (s_c x) does not couple readout
positions: every row (one x) is its own ny-unknown problem. For rows [rows, ny], maps
[rows, C, ny] and the ky mask:

    normal   N x = sum_c conj(s_c) iFFTc(m FFTc(s_c x))      (A^H A)
    adjoint  b   = sum_c conj(s_c) iFFTc(m y_c)              (A^H y)

Used by the classical solvers (gadgets/numerics/sense.py) and the PISF v3 runtime
(gadgets/numerics/pisf_unrolled.py); the torch twin is models.pisf_sense.FftNormal.
`RowSenseMaps` is the same operator with several maps per coil (soft SENSE: x [rows, M, ny],
the coil signal sum_m s_mc x_m).

Layout [rows, C, ny] (FFT along the contiguous last axis): measured on 256x256x8 complex64, one
application 4.3 ms vs 5.0 ms for [C, ny, rows] (scipy, 1 thread). scipy.fft ran 3x faster than
numpy.fft here (12 ms; numpy's pocketfft does not vectorise across transforms), so it is used
when importable and numpy.fft otherwise (same numbers up to float error).
"""
from __future__ import annotations

import numpy as np

try:                                    # why: 3x faster batched FFTs (see module docstring)
    import scipy.fft as _scipy_fft
except ImportError:                     # pragma: no cover - runtime images without scipy
    _scipy_fft = None


def fft_rows(data: np.ndarray, threads: int = 1, inverse: bool = False) -> np.ndarray:
    """Uncentred FFT (inverse: iFFT scaled by 1/n, so the pair is the identity) along the last
    axis, complex64 in and out; may overwrite `data`."""
    if _scipy_fft is not None:
        transform = _scipy_fft.ifft if inverse else _scipy_fft.fft
        return transform(data, axis=-1, overwrite_x=True, workers=max(1, threads))
    transform = np.fft.ifft if inverse else np.fft.fft
    return transform(data, axis=-1).astype(np.complex64, copy=False)


class RowSense:
    """SENSE normal operator and adjoint of rows (maps [rows, C, ny], mask [ny] or [rows, ny]).

    iFFTc(m FFTc(u)) = fftshift(ifft(m' fft(ifftshift(u)))) with m' = ifftshift(m), and the
    shift commutes with the coil sum: maps and mask are shifted once here, and one application
    shifts only x and the result."""

    def __init__(self, maps: np.ndarray, mask: np.ndarray, threads: int = 1):
        maps = np.asarray(maps, dtype=np.complex64)
        if maps.ndim != 3:
            raise ValueError(f"RowSense needs maps [rows, coils, ny]; got shape {maps.shape}")
        mask = (np.asarray(mask) > 0.5).astype(np.float32)
        mask = mask[None] if mask.ndim == 1 else mask
        self.threads = threads
        # contiguous: np.roll keeps a transposed input's strides, and strided FFTs run slower
        self.maps = np.ascontiguousarray(np.fft.ifftshift(maps, axes=-1))  # [rows, C, ny]
        self.conj_maps = self.maps.conj()
        self.mask = np.ascontiguousarray(np.fft.ifftshift(mask, axes=-1)[:, None, :])   # [rows|1, 1, ny]

    @classmethod
    def from_slice_maps(cls, maps: np.ndarray, mask: np.ndarray, threads: int = 1) -> "RowSense":
        """From maps in slice layout [C, ny, nx] (rows are the nx readout positions)."""
        return cls(np.asarray(maps).transpose(2, 0, 1), mask, threads)

    def normal(self, x: np.ndarray) -> np.ndarray:
        """N x for rows x [rows, ny] (complex64)."""
        coil = self.maps * np.fft.ifftshift(x, axes=-1)[:, None, :]
        coil = fft_rows(coil, self.threads)
        coil *= self.mask
        coil = fft_rows(coil, self.threads, inverse=True)
        coil *= self.conj_maps
        return np.fft.fftshift(coil.sum(axis=1), axes=-1)

    def adjoint(self, data: np.ndarray) -> np.ndarray:
        """A^H y for measured rows [rows, C, ny] (unsampled ky are masked out here)."""
        coil = np.fft.ifftshift(np.asarray(data, dtype=np.complex64), axes=-1) * self.mask
        coil = fft_rows(coil, self.threads, inverse=True) * np.float32(np.sqrt(coil.shape[-1]))  # orthonormal
        coil *= self.conj_maps
        return np.fft.fftshift(coil.sum(axis=1), axes=-1)

    def mean_diagonal(self) -> np.ndarray:
        """Mean of diag(N) per row [rows, 1]: sampled fraction x mean_y sum_c |s_c|^2 (+1e-6, as
        models.pisf_sense.mean_diagonal): the scale of PISF's lambda and mu."""
        power = np.sum(self.maps.real ** 2 + self.maps.imag ** 2, axis=1)         # [rows, ny]
        return (self.mask[:, 0].mean(-1, keepdims=True) * power.mean(-1, keepdims=True) + 1e-6).astype(np.float32)


class RowSenseMaps(RowSense):
    """RowSense with M maps (maps [rows, M, C, ny]): the unknown is x [rows, M, ny] and the coil
    signal is sum_m s_mc x_m (soft SENSE, ESPIRiT with several maps). A class of its own so that
    RowSense's one-map arithmetic (the PISF runtime's) stays as it is."""

    def __init__(self, maps: np.ndarray, mask: np.ndarray, threads: int = 1):
        maps = np.asarray(maps, dtype=np.complex64)
        if maps.ndim != 4:
            raise ValueError(f"RowSenseMaps needs maps [rows, maps, coils, ny]; got shape {maps.shape}")
        rows, count, coils, ny = maps.shape
        super().__init__(maps.reshape(rows, count * coils, ny), mask, threads)
        self.maps = self.maps.reshape(rows, count, coils, ny)
        self.conj_maps = self.conj_maps.reshape(rows, count, coils, ny)

    @classmethod
    def from_slice_maps(cls, maps: np.ndarray, mask: np.ndarray, threads: int = 1) -> "RowSenseMaps":
        """From maps in slice layout [M, C, ny, nx] (rows are the nx readout positions)."""
        return cls(np.asarray(maps).transpose(3, 0, 1, 2), mask, threads)

    def normal(self, x: np.ndarray) -> np.ndarray:
        """N x for rows x [rows, M, ny] (complex64)."""
        coil = np.sum(self.maps * np.fft.ifftshift(x, axes=-1)[:, :, None, :], axis=1)   # [rows, C, ny]
        coil = fft_rows(coil, self.threads)
        coil *= self.mask
        coil = fft_rows(coil, self.threads, inverse=True)
        return np.fft.fftshift(np.sum(self.conj_maps * coil[:, None], axis=2), axes=-1)

    def adjoint(self, data: np.ndarray) -> np.ndarray:
        """A^H y [rows, M, ny] for measured rows [rows, C, ny]."""
        coil = np.fft.ifftshift(np.asarray(data, dtype=np.complex64), axes=-1) * self.mask
        coil = fft_rows(coil, self.threads, inverse=True) * np.float32(np.sqrt(coil.shape[-1]))  # orthonormal
        return np.fft.fftshift(np.sum(self.conj_maps * coil[:, None], axis=2), axes=-1)

    def mean_diagonal(self) -> np.ndarray:
        raise NotImplementedError("the PISF scale is defined for one map")

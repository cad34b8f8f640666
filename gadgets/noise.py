"""Noise prewhitening: learn the coil noise covariance from noise readouts, whiten every line.

After whitening the coils have unit-variance, uncorrelated noise, which the RSS combination
and the PISF coil compression both assume.
"""
from __future__ import annotations

import ismrmrd
import numpy as np

from .context import InputError, StreamContext
from .items import Notice


def whitening_matrix(noise: list[np.ndarray], min_noise_samples: int = 64) -> np.ndarray | None:
    """L^-1 of the noise readouts' sample covariance L L^H ([coil, coil] complex64), or None when
    they are too short or singular. The simulator's ground truth whitens with this same matrix."""
    samples = np.concatenate(noise, axis=1).astype(np.complex128)
    if samples.shape[1] < min_noise_samples:
        return None
    covariance = samples @ samples.conj().T / (samples.shape[1] - 1)
    try:
        return np.linalg.inv(np.linalg.cholesky(covariance)).astype(np.complex64)
    except np.linalg.LinAlgError:
        return None


class NoisePrewhitening:
    def __init__(self, context: StreamContext, min_noise_samples: int = 64):
        self.context = context
        self.min_noise_samples = int(min_noise_samples)

    def _whitening(self, noise: list[np.ndarray]) -> np.ndarray | None:
        return whitening_matrix(noise, self.min_noise_samples)

    def __call__(self, items):
        noise_lines: list[np.ndarray] = []
        noise_dwell_us = None
        whitening = None
        for item in items:
            if not isinstance(item, ismrmrd.Acquisition):
                yield item
                continue
            if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                noise_lines.append(np.array(item.data))
                noise_dwell_us = item.sample_time_us
                whitening = None  # recomputed with all noise seen so far at the next data line
                continue
            if noise_lines and whitening is None:
                whitening = self._whitening(noise_lines)
                if whitening is None:
                    noise_lines = []
                    yield Notice("noise readouts are too short or singular: prewhitening skipped")
            if whitening is not None:
                if item.active_channels != whitening.shape[0]:
                    raise InputError(f"acquisition {item.scan_counter} has {item.active_channels} channels "
                                     f"but the noise readout had {whitening.shape[0]}")
                # Noise variance per sample scales with bandwidth, i.e. 1/dwell time.
                scale = 1.0
                if noise_dwell_us and item.sample_time_us:
                    scale = float(np.sqrt(item.sample_time_us / noise_dwell_us))
                item.data[:] = scale * (whitening @ item.data)
            yield item

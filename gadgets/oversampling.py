"""Readout oversampling removal, per line, before buffering (halves the data early)."""
from __future__ import annotations

import ismrmrd
import numpy as np

from .context import InputError, StreamContext
from .numerics.fft import fftc, ifftc


class RemoveOversampling:
    """Crops the readout FOV to the recon FOV in image space.

    The kept length follows the FOV ratio (encoded/recon along x), as on the scanner. Lines
    with an asymmetric echo are first placed into a full-length line at their centre sample, so
    the output is always the full cropped readout with the echo centre in the middle.
    """

    def __init__(self, context: StreamContext):
        self.context = context
        enc = context.encoding
        self.full_samples = enc.encoded_matrix[0]
        ratio = enc.encoded_fov_mm[0] / enc.recon_fov_mm[0] if enc.recon_fov_mm[0] > 0 else 1.0
        kept = int(round(self.full_samples / ratio)) if ratio > 1.0 else self.full_samples
        self.kept_samples = kept
        self.start = (self.full_samples - kept) // 2
        context.readout_samples = kept

    def __call__(self, items):
        for item in items:
            if (not isinstance(item, ismrmrd.Acquisition) or self.kept_samples == self.full_samples
                    or item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)):
                yield item
                continue
            yield self._crop(item)

    def _crop(self, acquisition: ismrmrd.Acquisition) -> ismrmrd.Acquisition:
        samples, centre = acquisition.number_of_samples, acquisition.center_sample
        offset = self.full_samples // 2 - centre
        if offset < 0 or offset + samples > self.full_samples:
            raise InputError(f"acquisition {acquisition.scan_counter} has {samples} samples with centre sample "
                             f"{centre}, which does not fit the encoded readout of {self.full_samples}")
        line = np.zeros((acquisition.active_channels, self.full_samples), dtype=np.complex64)
        line[:, offset:offset + samples] = acquisition.data
        cropped = fftc(ifftc(line)[:, self.start:self.start + self.kept_samples]).astype(np.complex64)
        acquisition.resize(number_of_samples=self.kept_samples, active_channels=acquisition.active_channels,
                           trajectory_dimensions=acquisition.trajectory_dimensions)
        acquisition.center_sample = self.kept_samples // 2
        acquisition.data[:] = cropped
        return acquisition

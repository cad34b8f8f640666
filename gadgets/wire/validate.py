"""Checks an acquisition against the header and the lines before it, before it reaches a chain.

Done on arrival, so a contradiction is reported by name and the chain can still reconstruct
every slice that was valid up to that point.
"""
from __future__ import annotations

import ismrmrd
import numpy as np

from ..context import Encoding, InputError


class AcquisitionValidator:
    def __init__(self, encoding: Encoding, slice_limit: int | None = None):
        self.encoding = encoding
        self.slice_limit = slice_limit
        self.channels = encoding.receiver_channels

    @staticmethod
    def for_header(header) -> "AcquisitionValidator":
        encoding = Encoding.from_header(header)
        limits = header.encoding[0].encodingLimits
        slice_limit = int(limits.slice.maximum) if limits is not None and limits.slice is not None else None
        return AcquisitionValidator(encoding, slice_limit)

    def check(self, acquisition: ismrmrd.Acquisition) -> None:
        number = acquisition.scan_counter
        channels = acquisition.active_channels
        if self.channels is None:
            self.channels = channels  # no receiverChannels in the header: the first line sets it
        if channels != self.channels:
            raise InputError(f"acquisition {number} has {channels} channels; the header and earlier lines "
                             f"say {self.channels}")
        if not np.isfinite(acquisition.data).all():
            raise InputError(f"acquisition {number} contains NaN or infinite samples")
        if acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            return
        samples, readout = acquisition.number_of_samples, self.encoding.encoded_matrix[0]
        if samples > readout:
            raise InputError(f"acquisition {number} has {samples} samples; the header's encoded readout "
                             f"matrix is {readout}")
        if acquisition.center_sample >= samples:
            raise InputError(f"acquisition {number} has centre sample {acquisition.center_sample} "
                             f"but only {samples} samples")
        ky_min, ky_max, _ = self.encoding.ky_limits
        step1 = acquisition.idx.kspace_encode_step_1
        if not ky_min <= step1 <= ky_max:
            raise InputError(f"acquisition {number} has kspace_encode_step_1 = {step1}, outside the "
                             f"header's encoding limits {ky_min}..{ky_max}")
        kz_min, kz_max, _ = self.encoding.kz_limits
        step2 = acquisition.idx.kspace_encode_step_2
        if self.encoding.encoded_matrix[2] > 1 and not kz_min <= step2 <= kz_max:
            raise InputError(f"acquisition {number} has kspace_encode_step_2 = {step2}, outside the "
                             f"header's encoding limits {kz_min}..{kz_max}")
        if self.slice_limit is not None and acquisition.idx.slice > self.slice_limit:
            raise InputError(f"acquisition {number} is for slice {acquisition.idx.slice}; the header's "
                             f"encoding limits end at slice {self.slice_limit}")

"""Zero-filled reconstruction: inverse FFT of the buffered k-space, coil combination."""
from __future__ import annotations

import numpy as np

from .context import StreamContext
from .numerics.coils import root_sum_of_squares
from .numerics.fft import ifftc
from .items import KSpaceSlice, Notice, ReconImage
from .numerics.sampling import sampling_of


def zero_filled_image(kspace: np.ndarray) -> np.ndarray:
    """RSS magnitude [kz, y, x] of k-space [coils, kz, ky, kx] with unsampled points at zero."""
    axes = (-3, -2, -1) if kspace.shape[1] > 1 else (-2, -1)
    return root_sum_of_squares(ifftc(kspace, axes=axes), axis=0).astype(np.float32)


class ZeroFilledRecon:
    def __init__(self, context: StreamContext):
        self.context = context

    def __call__(self, items):
        told = False
        for item in items:
            if not isinstance(item, KSpaceSlice):
                yield item
                continue
            sampling = sampling_of(item.kspace)
            meta = {"PISF_SampleAcceleration": f"{sampling.sample_acceleration:.2f}"} if sampling.holes_in_lines else {}
            if sampling.holes_in_lines and not told:
                told = True   # a zero-filled image is defined for any sampling: said once, images follow
                yield Notice(f"{item.key}: {sampling.describe()}; this chain sends the zero-filled image (no "
                             f"unaliasing: expect blur and noise-like artefacts)")
            yield ReconImage(key=item.key, data=zero_filled_image(item.kspace), line_header=item.line_header,
                             recon="zero-filled FFT, RSS coil combination", complete=item.complete,
                             last_line_time=item.last_line_time, meta=meta)

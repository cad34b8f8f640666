"""Zero-filled reconstruction: inverse FFT of the buffered k-space, coil combination."""
from __future__ import annotations

import numpy as np

from .context import StreamContext
from .numerics.coils import root_sum_of_squares
from .numerics.fft import ifftc
from .items import KSpaceSlice, ReconImage


def zero_filled_image(kspace: np.ndarray) -> np.ndarray:
    """RSS magnitude [kz, y, x] of k-space [coils, kz, ky, kx] with unsampled points at zero."""
    axes = (-3, -2, -1) if kspace.shape[1] > 1 else (-2, -1)
    return root_sum_of_squares(ifftc(kspace, axes=axes), axis=0).astype(np.float32)


class ZeroFilledRecon:
    def __init__(self, context: StreamContext):
        self.context = context

    def __call__(self, items):
        for item in items:
            if not isinstance(item, KSpaceSlice):
                yield item
                continue
            yield ReconImage(key=item.key, data=zero_filled_image(item.kspace), line_header=item.line_header,
                             recon="zero-filled FFT, RSS coil combination", complete=item.complete,
                             last_line_time=item.last_line_time)

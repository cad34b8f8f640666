"""Slice preparation: a KSpaceSlice from the stream -> the 2D problems the reconstructions solve.

Shared by the classical stages (gadgets/classical.py) and the PISF stage (gadgets/pisf.py), so
both see the same image lines, reference lines and partitions of a slice. What reference lines
are and which block of them calibrates: gadgets/numerics/reference.py.

Embedded ACS-only lines are image data (they are samples of this slice); separate and
interleaved references only calibrate, unless `acs_as_data` says otherwise. 3D scans
undersampled along ky only (the same ky lines in every partition) are transformed along kz and
become one 2D problem per partition.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import InputError, StreamContext
from .items import KSpaceSlice
from .numerics.fft import ifftc
from .numerics.reference import reference_block
from .numerics.sampling import Sampling, sampling_of


def calibration_mode(header) -> str | None:
    """The header's parallel-imaging calibration mode (embedded, separate, interleaved, ...), or None."""
    parallel = header.encoding[0].parallelImaging
    mode = getattr(parallel, "calibrationMode", None) if parallel is not None else None
    return getattr(mode, "value", mode)


def acs_as_data_default(context: StreamContext, acs_as_data: str | bool) -> bool:
    """Embedded ACS lines are measured k-space of this very slice, so data consistency keeps
    them; separate or interleaved references may differ (resolution, time) and only calibrate."""
    if acs_as_data == "auto":
        return calibration_mode(context.header) == "embedded"
    return bool(acs_as_data)


@dataclass
class SliceData:
    """One 2D slice as the reconstructions see it.

    kspace [C, ny, nx]: image lines (zeros elsewhere); mask [ny] float32: the image lines;
    reference_kspace [C, ny, nx] and reference_lines [ny] bool: the reference lines, or None."""
    kspace: np.ndarray
    mask: np.ndarray
    reference_kspace: np.ndarray | None = None
    reference_lines: np.ndarray | None = None

    @property
    def coils(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def ny(self) -> int:
        return int(self.kspace.shape[1])

    @property
    def acceleration(self) -> float:
        """ny / number of image lines (embedded ACS lines included, the fastMRI convention)."""
        return float(self.mask.size / max(float(self.mask.sum()), 1.0))

    def has_reference_lines(self) -> bool:
        return (self.reference_kspace is not None and self.reference_lines is not None
                and bool(np.any(self.reference_lines)))

    def reference_block(self) -> tuple[np.ndarray, int, str]:
        """(reference block [C, L, nx], L, where it came from): the contiguous run of reference
        lines through the centre, else the fully sampled centre run of the image lines."""
        if self.has_reference_lines():
            return reference_block(self.kspace, self.mask, self.reference_kspace, self.reference_lines)
        return reference_block(self.kspace, self.mask)


def slice_data(item: KSpaceSlice, acs_as_data: bool, partition: int = 0) -> SliceData:
    """SliceData of one kz plane of a KSpaceSlice (plane 0 for 2D)."""
    kspace = item.kspace[:, partition]
    sampled = item.sampled[partition]
    reference = lines = None
    if item.calibration is not None and item.calibration_sampled[partition].any():
        reference, lines = item.calibration[:, partition], item.calibration_sampled[partition]
        if acs_as_data and not item.reference_shared:   # another image's reference is never this image's data
            acs_only = lines & ~sampled
            if acs_only.any():
                kspace = kspace.copy()
                kspace[:, acs_only] = reference[:, acs_only]
                sampled = sampled | acs_only
    return SliceData(kspace, sampled.astype(np.float32), reference, lines)


def partitions(item: KSpaceSlice, acs_as_data: bool, sampling: Sampling | None = None) -> list[SliceData]:
    """The 2D problems of a slice: itself (2D), or, for a 3D scan undersampled along ky only (the
    same ky lines in every partition), its partitions after the inverse FFT along kz. sampling:
    `sampling_of(item.kspace)` where the caller has it already (a pass over all of the k-space)."""
    sampling = sampling if sampling is not None else sampling_of(item.kspace)
    if sampling.holes_in_lines:
        # SENSE, GRAPPA and PISF here solve one problem per readout row after the FFT along kx,
        # which is exact only when whole lines are measured
        raise InputError(f"{item.key}: {sampling.describe()}. The reconstructions of this chain unalias along ky "
                         f"only (one 1D problem per readout row) and cannot fill holes inside lines; refused. "
                         f"The sense chain reconstructs such slices (2D CG-SENSE); the zerofill chain gives the "
                         f"zero-filled image")
    nz = item.kspace.shape[1]
    if nz == 1:
        return [slice_data(item, acs_as_data)]
    if not (item.sampled == item.sampled[:1]).all():
        raise InputError(f"{item.key}: this 3D scan is undersampled along kz as well; the classical "
                         "reconstructions here handle ky undersampling only")
    planes = KSpaceSlice(item.key, ifftc(item.kspace, axes=(1,)).astype(np.complex64), item.sampled,
                         None if item.calibration is None else ifftc(item.calibration, axes=(1,)).astype(np.complex64),
                         None if item.calibration_sampled is None
                         else np.broadcast_to(item.calibration_sampled.any(axis=0), item.sampled.shape),
                         item.line_header, item.complete, item.last_line_time,
                         reference_shared=item.reference_shared)
    return [slice_data(planes, acs_as_data, z) for z in range(nz)]

"""Turn a k-space array and a 1D mask into an ISMRMRD header and acquisitions (one per sampled ky).

Lets retrospectively undersampled data (the real data in ../shared/data) stream through the
server exactly like a scan, so server images can be compared with offline evaluation.
"""
from __future__ import annotations

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np


def header_for(coils: int, ny: int, nx: int, fov_mm=(256.0, 256.0, 5.0), slices: int = 1) -> str:
    """A minimal valid Cartesian header: encoded = recon matrix, ky limits 0..ny-1 around ny // 2."""
    def space():
        return xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=1),
                                     fieldOfView_mm=xsd.fieldOfViewMm(x=fov_mm[0], y=fov_mm[1], z=fov_mm[2]))

    limits = xsd.encodingLimitsType(kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=ny - 1, center=ny // 2),
                                    slice=xsd.limitType(minimum=0, maximum=slices - 1, center=0))
    encoding = xsd.encodingType(encodedSpace=space(), reconSpace=space(), encodingLimits=limits,
                                trajectory=xsd.trajectoryType.CARTESIAN)
    header = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_200_000),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(receiverChannels=coils),
        encoding=[encoding])
    return xsd.ToXML(header)


def acquisitions_from_kspace(kspace: np.ndarray, mask: np.ndarray, fov_mm=(256.0, 256.0, 5.0),
                             reference_lines: np.ndarray | None = None):
    """(header XML, acquisitions) for K[coils, ky, kx] sampled where mask[ky] > 0, ky ascending.

    reference_lines [ky] (optional): calibration lines, flagged as a scanner flags them: lines
    that are also image lines are ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING (embedded ACS); the
    others ACQ_IS_PARALLEL_CALIBRATION (a separate reference, streamed first)."""
    coils, ny, nx = kspace.shape
    image = np.asarray(mask) > 0.5
    reference = np.zeros(ny, dtype=bool) if reference_lines is None else np.asarray(reference_lines, dtype=bool)
    order = [(int(ky), False) for ky in np.flatnonzero(reference & ~image)]
    order += [(int(ky), True) for ky in np.flatnonzero(image)]
    acquisitions = []
    for number, (ky, is_image) in enumerate(order):
        acquisition = cartesian_line(kspace[:, ky, :], ky, counter=number, last=number == len(order) - 1)
        acquisition.acquisition_time_stamp = number * 4  # 10 ms per line in 2.5 ms ticks
        if reference[ky]:
            acquisition.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING if is_image
                                 else ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        acquisitions.append(acquisition)
    return header_for(coils, ny, nx, fov_mm), acquisitions


def cartesian_line(data: np.ndarray, ky: int, slice_: int = 0, counter: int = 0,
                   last: bool = False) -> ismrmrd.Acquisition:
    """One axial Cartesian line [coils, samples] at ky, echo in the middle of the readout."""
    acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64),
                                                 center_sample=data.shape[1] // 2, scan_counter=counter)
    acquisition.idx.kspace_encode_step_1 = ky
    acquisition.idx.slice = slice_
    acquisition.read_dir[:] = (1.0, 0.0, 0.0)
    acquisition.phase_dir[:] = (0.0, 1.0, 0.0)
    acquisition.slice_dir[:] = (0.0, 0.0, 1.0)
    if last:
        acquisition.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    return acquisition

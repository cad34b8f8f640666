"""Gadgetron ReconData (BucketToBuffer output, message 1023) -> our KSpaceSlice items.

gadgetron-python 1.4.1 reads a ReconData as a list of ReconBits; each bit has `data` (a
ReconBuffer) and optionally `ref` (the calibration buffer). A ReconBuffer holds
  data:     complex64 [RO, E1, E2, CHA, N, S, LOC]
  headers:  AcquisitionHeader array [E1, E2, N, S, LOC] (all zero where no line was placed)
  sampling: SamplingDescription (encoded/recon FOV and matrix, sampling limits per dimension).
Every (N, S, LOC) of a buffer becomes one KSpaceSlice. Lines are placed by their own headers'
encoding counters, exactly as our SliceAccumulator places streamed lines (ky relative to the
encoding-limit centre), so the same recon stages give the same images whichever side buffered
the data. The `ref` buffer becomes the slice's calibration (ACS) data.

Gadgetron has already done noise prewhitening, readout oversampling removal and buffering, so
these items go straight to a recon stage (pisf_recon / zerofill_recon) and image_finish.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import ismrmrd
import numpy as np

from ..accumulate import slice_or_empty_image
from ..context import InputError, StreamContext
from ..input_checks import header_refusal
from ..items import KSpaceSlice, SliceKey


def _is_recon_data(item) -> bool:
    return hasattr(item, "bits") and type(item).__name__ == "ReconData"


def _line_present(header) -> bool:
    return int(header.number_of_samples) > 0 or int(header.active_channels) > 0


def _placed_lines(buffer, n: int, s: int, loc: int):
    """(e1, e2, header) of every line present in the buffer at (n, s, loc)."""
    headers = np.asarray(buffer.headers, dtype=object)
    while headers.ndim < 5:
        headers = headers[..., None]
    for e2 in range(headers.shape[1]):
        for e1 in range(headers.shape[0]):
            header = headers[e1, e2, n, s, loc]
            if header is not None and _line_present(header):
                yield e1, e2, header


def _buffer_data(buffer) -> np.ndarray:
    data = np.asarray(buffer.data)
    if data.ndim < 7:
        data = data.reshape(data.shape + (1,) * (7 - data.ndim))
    return data


class ReconDataAdapter:
    """Turns ReconData items into KSpaceSlices (other items pass through unchanged)."""

    def __init__(self, context: StreamContext):
        refusal = header_refusal(context.header)   # as the slice accumulator refuses it on our server
        if refusal:
            raise InputError(refusal)
        self.context = context
        self.encoding = context.encoding
        self.ny, self.nz = self.encoding.encoded_matrix[1], self.encoding.encoded_matrix[2]

    def __call__(self, items: Iterable) -> Iterator:
        for item in items:
            if not _is_recon_data(item):
                yield item
                continue
            arrival = time.monotonic()
            for bit in item.bits:
                yield from self._slices(bit, arrival)

    def _target(self, header) -> tuple[int, int]:
        # the same placement rule as SliceAccumulator, so both sides buffer identically
        ky = self.encoding.ky_row(int(header.idx.kspace_encode_step_1))
        kz = self.encoding.kz_plane(int(header.idx.kspace_encode_step_2))
        if not (0 <= ky < self.ny and 0 <= kz < self.nz):
            raise InputError(f"ReconData line with kspace_encode_step_1 {header.idx.kspace_encode_step_1} / step_2 "
                             f"{header.idx.kspace_encode_step_2} lies outside the encoded matrix of the header")
        return kz, ky

    def _fill(self, buffer, n, s, loc, kspace, sampled) -> list:
        data = _buffer_data(buffer)
        readout = data.shape[0]
        headers = []
        for e1, e2, header in _placed_lines(buffer, n, s, loc):
            kz, ky = self._target(header)
            kspace[:, kz, ky, :] = data[:readout, e1, e2, :, n, s, loc].T
            sampled[kz, ky] = True
            headers.append((abs(ky - self.ny // 2), header))
        return headers

    def _slices(self, bit, arrival: float) -> Iterator[KSpaceSlice]:
        data = _buffer_data(bit.data)
        readout, _, _, coils, count_n, count_s, count_loc = data.shape
        for loc in range(count_loc):
            for s in range(count_s):
                for n in range(count_n):
                    kspace = np.zeros((coils, self.nz, self.ny, readout), np.complex64)
                    sampled = np.zeros((self.nz, self.ny), bool)
                    headers = self._fill(bit.data, n, s, loc, kspace, sampled)
                    if not headers:
                        continue
                    calibration = calibration_sampled = None
                    if bit.ref is not None:
                        ref = _buffer_data(bit.ref)
                        ref_n, ref_s, ref_loc = (min(n, ref.shape[4] - 1), min(s, ref.shape[5] - 1),
                                                 min(loc, ref.shape[6] - 1))
                        calibration = np.zeros((ref.shape[3], self.nz, self.ny, ref.shape[0]), np.complex64)
                        calibration_sampled = np.zeros_like(sampled)
                        self._fill(bit.ref, ref_n, ref_s, ref_loc, calibration, calibration_sampled)
                        if calibration.shape != kspace.shape:
                            raise InputError(f"the ReconData reference buffer {calibration.shape} does not match "
                                             f"its data buffer {kspace.shape} (coils, kz, ky, readout)")
                    line_header = min(headers, key=lambda pair: pair[0])[1]
                    if not isinstance(line_header, ismrmrd.AcquisitionHeader):
                        line_header = ismrmrd.AcquisitionHeader.from_buffer_copy(bytes(line_header))
                    yield from slice_or_empty_image(KSpaceSlice(
                        key=SliceKey.of(line_header.idx), kspace=kspace, sampled=sampled, calibration=calibration,
                        calibration_sampled=calibration_sampled, line_header=line_header, complete=True,
                        last_line_time=arrival))

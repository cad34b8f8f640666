"""Buffers lines per (slice, contrast, phase, repetition, set) into k-space and emits slices.

Placement follows the encoding: ky (and kz) relative to the encoding-limit centre, kx relative
to each line's centre sample, so partial Fourier and asymmetric echoes land where they belong.
ACS-only lines go to the calibration buffer only; ACS-and-imaging lines go to both.
A separate reference scan (header calibrationMode separate), where a reference_prep stage prepares
it: each slice position's reference lines go out as a ReferenceData item as soon as they are
complete (at the first line that is not one of them, or at one flagged ACQ_LAST_IN_SLICE), so
their calibration starts before the image lines; they stay in the slice's calibration buffer too.
A slice is emitted at LAST_IN_SLICE, or as soon as every ky of the encoding limits is there;
slices still open when the stream ends are flushed with a warning rather than lost.

Placing lines on a Cartesian grid is only right for Cartesian data: the header's trajectory is
checked when the chain is built and reversed (EPI) imaging lines are refused as they arrive
(gadgets/input_checks.py). A slice whose samples are all zero is not reconstructed: it goes out
as a zero image with a TEXT saying so (a network or a coil combination would make something of
nothing, and image finishing must not take its scale from it).
"""
from __future__ import annotations

import time

import ismrmrd
import numpy as np

from .context import InputError, StreamContext
from .input_checks import PHASE_CORRECTION_NOTICE, header_refusal, reversed_line_refusal
from .items import KSpaceSlice, Notice, ReconImage, ReferenceData, SliceKey
from .numerics.sampling import is_empty
from .slices import calibration_mode

EMPTY_SLICE_RECON = "empty slice: every sample zero, not reconstructed"

# Lines that are not k-space samples of the image (navigators, phase correction, ...).
_SKIPPED_FLAGS = (ismrmrd.ACQ_IS_NOISE_MEASUREMENT, ismrmrd.ACQ_IS_NAVIGATION_DATA,
                  ismrmrd.ACQ_IS_PHASECORR_DATA, ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
                  ismrmrd.ACQ_IS_HPFEEDBACK_DATA, ismrmrd.ACQ_IS_RTFEEDBACK_DATA)


class _OpenSlice:
    def __init__(self, key: SliceKey, coils: int, shape: tuple[int, int, int]):
        kz, ky, kx = shape
        self.key = key
        self.kspace = np.zeros((coils, kz, ky, kx), dtype=np.complex64)
        self.sampled = np.zeros((kz, ky), dtype=bool)
        self.calibration = None
        self.calibration_sampled = None
        self.line_header = None
        self.line_header_distance = None
        self.first_line_time = None

    def add_calibration(self, kz, ky, x0, data):
        if self.calibration is None:
            self.calibration = np.zeros_like(self.kspace)
            self.calibration_sampled = np.zeros_like(self.sampled)
        self.calibration[:, kz, ky, x0:x0 + data.shape[1]] = data
        self.calibration_sampled[kz, ky] = True


class SliceAccumulator:
    def __init__(self, context: StreamContext):
        refusal = header_refusal(context.header)
        if refusal:
            raise InputError(refusal)       # before any line: the client hears it after its header
        self.context = context
        enc = context.encoding
        self.encoding = enc
        self.ny, self.nz = enc.encoded_matrix[1], enc.encoded_matrix[2]
        self.ky_min, self.ky_max, _ = enc.ky_limits
        self.open: dict[SliceKey, _OpenSlice] = {}
        self.separate = calibration_mode(context.header) == "separate"
        self.pending_reference: SliceKey | None = None     # separate reference lines still arriving

    def _position(self, acquisition: ismrmrd.Acquisition) -> tuple[int, int, int]:
        """(kz, ky, first kx) of a line in the buffer, or InputError when it does not fit."""
        step1, step2 = acquisition.idx.kspace_encode_step_1, acquisition.idx.kspace_encode_step_2
        ky, kz = self.encoding.ky_row(step1), self.encoding.kz_plane(step2)
        if not (self.ky_min <= step1 <= self.ky_max) or not 0 <= ky < self.ny:
            raise InputError(f"acquisition {acquisition.scan_counter} has kspace_encode_step_1 = {step1}, outside "
                             f"the encoding limits {self.ky_min}..{self.ky_max} of the header")
        if not 0 <= kz < self.nz:
            raise InputError(f"acquisition {acquisition.scan_counter} has kspace_encode_step_2 = {step2}, outside "
                             f"the encoded matrix (z = {self.nz})")
        nx = self.context.readout_samples
        x0 = nx // 2 - acquisition.center_sample
        if x0 < 0 or x0 + acquisition.number_of_samples > nx:
            raise InputError(f"acquisition {acquisition.scan_counter} has {acquisition.number_of_samples} samples "
                             f"with centre sample {acquisition.center_sample}, which does not fit a readout of "
                             f"{nx} samples")
        return kz, ky, x0

    def __call__(self, items):
        # read when the stream starts: the reference_prep stage is built after this one
        references = self.separate and getattr(self.context, "reference_preparation", None) is not None
        phase_correction_told = False
        for item in items:
            if not isinstance(item, ismrmrd.Acquisition):
                yield item
                continue
            if any(item.is_flag_set(flag) for flag in _SKIPPED_FLAGS):
                if item.is_flag_set(ismrmrd.ACQ_IS_PHASECORR_DATA) and not phase_correction_told:
                    phase_correction_told = True
                    yield Notice(PHASE_CORRECTION_NOTICE)
                continue
            if item.is_flag_set(ismrmrd.ACQ_IS_REVERSE):
                raise InputError(reversed_line_refusal(item))
            reference_line = references and item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            key = SliceKey.of(item.idx)
            if self.pending_reference is not None and not (reference_line and key == self.pending_reference):
                yield from self._reference_data()
            finished = self._add(item)
            if reference_line:
                self.pending_reference = key
                if item.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
                    yield from self._reference_data()
            if finished is not None:
                self.context.check_cancelled(f"{finished.key}")   # a client that has gone gets no more slices
                yield from self._slice_out(finished, complete=True, arrival=self.context.last_arrival)
        yield from self._reference_data()
        for key in sorted(self.open):
            self.context.check_cancelled(f"{key}")
            open_slice = self.open[key]
            if open_slice.line_header is None:  # ACS lines only: nothing to reconstruct
                yield Notice(f"calibration lines of {key} arrived without imaging lines: no image")
                continue
            lines = int(open_slice.sampled.sum())
            yield Notice(f"{key}: the stream ended before its last line ({lines} lines received); "
                         f"reconstructed what arrived")
            yield from self._slice_out(open_slice, complete=False, arrival=None)
        self.open.clear()

    def _reference_data(self):
        """The pending separate reference as a ReferenceData item (a copy of its lines)."""
        key, self.pending_reference = self.pending_reference, None
        open_slice = self.open.get(key) if key is not None else None
        if open_slice is not None and open_slice.calibration is not None:
            sampled = open_slice.calibration_sampled
            yield ReferenceData(key, open_slice.calibration[:, sampled], sampled.copy(),
                                self.context.last_arrival or time.monotonic())

    def _add(self, acquisition: ismrmrd.Acquisition) -> _OpenSlice | None:
        key = SliceKey.of(acquisition.idx)
        kz, ky, x0 = self._position(acquisition)
        open_slice = self.open.get(key)
        if open_slice is None:
            shape = (self.nz, self.ny, self.context.readout_samples)
            open_slice = self.open[key] = _OpenSlice(key, acquisition.active_channels, shape)
        if acquisition.active_channels != open_slice.kspace.shape[0]:
            raise InputError(f"acquisition {acquisition.scan_counter} has {acquisition.active_channels} channels, "
                             f"earlier lines of {key} had {open_slice.kspace.shape[0]}")
        calibration = (acquisition.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                       or acquisition.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))
        imaging = not acquisition.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        data = acquisition.data
        if calibration:
            open_slice.add_calibration(kz, ky, x0, data)
        if not imaging:
            return None  # an ACS-only line never ends a slice: imaging lines follow
        open_slice.kspace[:, kz, ky, x0:x0 + data.shape[1]] = data
        open_slice.sampled[kz, ky] = True
        if open_slice.first_line_time is None:
            open_slice.first_line_time = self.context.last_arrival or time.monotonic()
        # Geometry comes from the line nearest the k-space centre (all agree for 2D Cartesian).
        distance = abs(ky - self.ny // 2)
        if open_slice.line_header is None or distance < open_slice.line_header_distance:
            open_slice.line_header = acquisition.getHead()
            open_slice.line_header_distance = distance
        if acquisition.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) or self._fully_sampled(open_slice):
            return self.open.pop(key)
        return None

    def _fully_sampled(self, open_slice: _OpenSlice) -> bool:
        lo, hi = self.encoding.ky_row(self.ky_min), self.encoding.ky_row(self.ky_max)
        return bool(open_slice.sampled[:, lo:hi + 1].all())

    def _slice_out(self, open_slice: _OpenSlice, complete: bool, arrival: float | None):
        """The slice for the recon stage, or, when every sample is zero, a TEXT and a zero image."""
        yield from slice_or_empty_image(self._emit(open_slice, complete, arrival))

    @staticmethod
    def _emit(open_slice: _OpenSlice, complete: bool, arrival: float | None) -> KSpaceSlice:
        return KSpaceSlice(key=open_slice.key, kspace=open_slice.kspace, sampled=open_slice.sampled,
                           calibration=open_slice.calibration, calibration_sampled=open_slice.calibration_sampled,
                           line_header=open_slice.line_header, complete=complete,
                           last_line_time=arrival if arrival is not None else time.monotonic(),
                           first_line_time=open_slice.first_line_time)


def slice_or_empty_image(item: KSpaceSlice) -> list:
    """[item] for the recon stage, or, when every sample is zero, [TEXT, zero image] (shared with
    the ReconData adapter of gadgets/gadgetron_external, which buffers without this stage)."""
    if not is_empty(item.kspace):
        return [item]
    coils, nz, ny, nx = item.kspace.shape
    notice = Notice(f"{item.key}: all {int(item.sampled.sum())} lines hold only zeros (an empty slice): a zero "
                    f"image is sent in its place, nothing is reconstructed")
    return [notice, ReconImage(key=item.key, data=np.zeros((nz, ny, nx), dtype=np.float32),
                               line_header=item.line_header, recon=EMPTY_SLICE_RECON, meta={"PISF_Empty": "true"},
                               complete=item.complete, last_line_time=item.last_line_time)]

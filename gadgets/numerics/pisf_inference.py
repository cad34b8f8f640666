"""PISF inference core shared by the recon gadget and `pisf evaluate` (numpy + onnxruntime only).

Implements the runtime half of models/CONTRACT.md: coil compression, normalisation, readout
iFFT, one batched ONNX run over all rows of the slice (optionally chunked), inverse scaling,
iFFT along ky and root-sum-of-squares. No torch import here.
"""
from __future__ import annotations

import os

import numpy as np

from .coils import coil_compression_matrix, compress, normalisation_scale, root_sum_of_squares
from .fft import fftc, ifftc

MIN_ACS_LINES = 4


def calibration_lines(mask: np.ndarray) -> np.ndarray:
    """Boolean [ny]: the contiguous sampled run through the centre (the ACS block) when it has at
    least MIN_ACS_LINES lines, otherwise every sampled line (CONTRACT.md: ACS if present)."""
    sampled = np.asarray(mask) > 0.5
    ny, centre = sampled.shape[0], sampled.shape[0] // 2
    if not sampled[centre]:
        return sampled
    lo = centre
    while lo > 0 and sampled[lo - 1]:
        lo -= 1
    hi = centre
    while hi < ny - 1 and sampled[hi + 1]:
        hi += 1
    run = np.zeros(ny, dtype=bool)
    run[lo:hi + 1] = True
    return run if run.sum() >= MIN_ACS_LINES else sampled


def reflect_ky(rows: np.ndarray) -> np.ndarray:
    """k -> -k along the last axis about the centre ny // 2 (image y -> -y). Self-inverse."""
    ny = rows.shape[-1]
    flipped = rows[..., ::-1]
    return np.roll(flipped, 1, axis=-1) if ny % 2 == 0 else flipped


def to_rows(hybrid: np.ndarray) -> np.ndarray:
    """[C, ny, rows] complex -> network layout [rows, 2C, ny] float32 (real parts, then imag)."""
    stacked = np.concatenate([hybrid.real, hybrid.imag], axis=0)       # [2C, ny, rows]
    return np.ascontiguousarray(stacked.transpose(2, 0, 1), dtype=np.float32)


def from_rows(rows: np.ndarray, coils: int) -> np.ndarray:
    """Network layout [rows, 2C, ny] -> complex [C, ny, rows]."""
    data = rows[:, :coils] + 1j * rows[:, coils:]
    return data.transpose(1, 2, 0).astype(np.complex64)


class PisfReconstructor:
    """Loads a PISF ONNX model once; `reconstruct` turns one slice into a magnitude image."""

    def __init__(self, model_path: str | os.PathLike, providers: list | None = None,
                 threads: int = 0, max_rows_per_run: int = 0, reflect_average: bool = False,
                 io_binding: bool = False):
        """providers: names or (name, options) pairs, in order of preference.
        reflect_average: also run every row mirrored (k -> -k) and average the two outputs
        (test-time augmentation; doubles the inference time).
        io_binding: run through an onnxruntime IOBinding (inputs bound once, the output kept on
        the provider's device until one copy back), which saves copies on GPU providers."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), options,
                                            providers=providers or ["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.coils = int(meta.get("coils", 8))
        self.variant = meta.get("pisf_variant", "unknown")
        self.max_rows_per_run = max_rows_per_run
        self.reflect_average = reflect_average
        self.io_binding = io_binding
        gpu = self.session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.output_device = "cuda" if gpu else "cpu"

    # ---------------------------------------------------------------- contract preprocessing
    def preprocess(self, kspace: np.ndarray, mask: np.ndarray, calibration: np.ndarray | None = None):
        """K[coils, ky, kx], mask[ky] -> (rows [kx, 2C, ny], scale, compressed masked K[C, ky, kx])."""
        kspace = np.asarray(kspace, dtype=np.complex64)
        mask = (np.asarray(mask) > 0.5).astype(np.float32)
        if calibration is None:
            calibration = kspace[:, calibration_lines(mask), :]
        matrix = coil_compression_matrix(np.asarray(calibration, dtype=np.complex64), self.coils)
        measured = compress(kspace * mask[None, :, None], matrix)
        scale = normalisation_scale(measured, mask)
        hybrid = ifftc(measured, axes=(-1,)) / scale                     # [C, ky, x]
        return to_rows(hybrid), scale, measured

    def run_rows(self, rows: np.ndarray, row_masks: np.ndarray) -> np.ndarray:
        """The ONNX model on rows [n, 2C, ny] with masks [n, 1, ny] (chunked if configured,
        averaged with the mirrored rows if reflect_average)."""
        output = self._run_chunks(rows, row_masks)
        if self.reflect_average:
            mirrored = self._run_chunks(np.ascontiguousarray(reflect_ky(rows)),
                                        np.ascontiguousarray(reflect_ky(row_masks)))
            output = 0.5 * (output + reflect_ky(mirrored))
        return output

    def _run_chunks(self, rows: np.ndarray, row_masks: np.ndarray) -> np.ndarray:
        step = self.max_rows_per_run if self.max_rows_per_run > 0 else rows.shape[0]
        outputs = [self._run_once(np.ascontiguousarray(rows[i:i + step]), np.ascontiguousarray(row_masks[i:i + step]))
                   for i in range(0, rows.shape[0], step)]
        return np.concatenate(outputs, axis=0)

    def _run_once(self, rows: np.ndarray, row_masks: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run(["kspace_out"], {"kspace": rows, "mask": row_masks})[0]
        binding = self.session.io_binding()  # one per call: sessions are shared across threads
        binding.bind_cpu_input("kspace", rows)
        binding.bind_cpu_input("mask", row_masks)
        binding.bind_output("kspace_out", self.output_device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    # ---------------------------------------------------------------- reconstruction
    def reconstruct_coils(self, kspace: np.ndarray, mask: np.ndarray,
                          calibration: np.ndarray | None = None) -> np.ndarray:
        """Virtual-coil images [C, ky, kx] (complex64) of one slice, 1D mask along ky."""
        rows, scale, _ = self.preprocess(kspace, mask, calibration)
        ny = rows.shape[-1]
        row_masks = np.broadcast_to((np.asarray(mask) > 0.5).astype(np.float32)[None, None],
                                    (rows.shape[0], 1, ny)).copy()
        hybrid = from_rows(self.run_rows(rows, row_masks), self.coils) * scale   # [C, ky, x]
        return ifftc(hybrid, axes=(-2,))

    def reconstruct(self, kspace: np.ndarray, mask: np.ndarray,
                    calibration: np.ndarray | None = None) -> np.ndarray:
        """Coil-combined magnitude image [ky, kx] (float32) from K[coils, ky, kx] and mask.

        mask [ky]: the contract path (1D undersampling along ky, kx fully sampled).
        mask [ky, kx]: 2D undersampling; the 1D model runs along both axes and the two
        k-space estimates are averaged (see reconstruct_coils_2d)."""
        mask = np.asarray(mask)
        if mask.ndim == 2:
            images = self.reconstruct_coils_2d(kspace, mask, calibration)
        else:
            images = self.reconstruct_coils(kspace, mask, calibration)
        return root_sum_of_squares(images).astype(np.float32)

    def reconstruct_coils_2d(self, kspace: np.ndarray, mask2d: np.ndarray,
                             calibration: np.ndarray | None = None,
                             per_row_scale: bool = True) -> np.ndarray:
        """2D-undersampled K[coils, ky, kx] with mask2d[ky, kx] (no axis fully sampled).

        Every k-space line along one axis is a 1D problem with its own mask (the mask column or
        row), the other axis staying in k-space; the estimates along ky and along kx are
        averaged, then both axes are inverse transformed. Because lines far from the centre
        carry little energy, each line is scaled by its own zero-filled max when
        per_row_scale (the network is not scale-equivariant)."""
        kspace = np.asarray(kspace, dtype=np.complex64)
        mask2d = (np.asarray(mask2d) > 0.5).astype(np.float32)
        if calibration is None:
            cal_y = calibration_lines(mask2d[:, mask2d.shape[1] // 2])
            cal_x = calibration_lines(mask2d[mask2d.shape[0] // 2, :])
            calibration = kspace[:, cal_y][:, :, cal_x]
        matrix = coil_compression_matrix(np.asarray(calibration, dtype=np.complex64), self.coils)
        measured = compress(kspace * mask2d[None], matrix)                # [C, ky, kx]
        slice_scale = float(np.abs(ifftc(measured, axes=(-2, -1))).max()) or 1.0
        estimates = []
        for axis in (1, 2):          # 1: lines along ky (one per kx); 2: lines along kx
            lines = measured if axis == 1 else measured.transpose(0, 2, 1)   # [C, n, rows]
            line_masks = mask2d if axis == 1 else mask2d.T                   # [n, rows]
            if per_row_scale:
                zero_filled = np.abs(ifftc(lines, axes=(1,))).max(axis=(0, 1))   # [rows]
                scales = np.where(zero_filled > 0, zero_filled, 1.0).astype(np.float32)
            else:
                scales = np.full(lines.shape[2], slice_scale, dtype=np.float32)
            rows = to_rows(lines / scales[None, None, :])
            row_masks = np.ascontiguousarray(line_masks.T[:, None, :])
            out = from_rows(self.run_rows(rows, row_masks), self.coils) * scales[None, None, :]
            estimates.append(out if axis == 1 else out.transpose(0, 2, 1))
        return ifftc(0.5 * (estimates[0] + estimates[1]), axes=(-2, -1))


def zero_filled(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RSS magnitude of the zero-filled coil images (1D mask along ky or a 2D mask)."""
    mask = np.asarray(mask, dtype=np.float32)
    full_mask = mask[None, :, None] if mask.ndim == 1 else mask[None]
    return root_sum_of_squares(ifftc(kspace * full_mask, axes=(-2, -1))).astype(np.float32)


def kspace_from_coil_images(coil_images: np.ndarray) -> np.ndarray:
    """Centred 2D FFT of coil images [coils, ny, nx]."""
    return fftc(coil_images, axes=(-2, -1)).astype(np.complex64)

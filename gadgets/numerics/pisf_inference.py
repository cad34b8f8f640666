"""PISF inference core shared by the recon gadget and `pisf evaluate` (numpy + onnxruntime only).

Implements the runtime half of models/CONTRACT.md: coil compression, normalisation, readout
iFFT, one batched ONNX run over all rows of the slice (optionally chunked), inverse scaling.
Contract 1 (calibration-free network): iFFT along ky and root-sum-of-squares of the virtual
coils. Contract 2 (scan-calibrated network): ESPIRiT maps of the virtual coils from the scan's
reference lines go in beside the data, and the network returns the coil-combined image.
No torch import here.
"""
from __future__ import annotations

import os

import numpy as np

from .calibration import MIN_REFERENCE_LINES, compressed_maps, reference_run
from .coils import coil_compression_matrix, compress, normalisation_scale, root_sum_of_squares
from .fft import fftc, ifftc

MIN_ACS_LINES = 4
# contract -> (input names, output name); models/CONTRACT.md
CONTRACTS = {"1": (("kspace", "mask"), "kspace_out"),
             "2": (("kspace", "mask", "sens"), "image")}


class ModelContractError(ValueError):
    """The ONNX file does not follow a contract this runtime implements."""


def calibration_lines(mask: np.ndarray) -> np.ndarray:
    """Boolean [ny]: the contiguous sampled run through the centre (the ACS block) when it has at
    least MIN_ACS_LINES lines, otherwise every sampled line (CONTRACT.md: ACS if present)."""
    sampled = np.asarray(mask) > 0.5
    if not sampled[sampled.shape[0] // 2]:
        return sampled
    run = reference_run(sampled)                  # the run through the centre
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
                 io_binding: bool = False, virtual_coils: int = 16):
        """providers: names or (name, options) pairs, in order of preference.
        virtual_coils: contract 2 compresses to at most this many coils (the graph takes any
        count; on a 16-channel in-vivo brain, 8 virtual coils cost 4-9 dB of SENSE PSNR against 12
        or 16).
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
        self.contract = check_contract(self.session, self.metadata, model_path)
        self.input_names, self.output_name = CONTRACTS[self.contract]
        self.coils = int(meta.get("coils", 8))
        self.virtual_coils = int(virtual_coils)
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

    def run_rows(self, rows: np.ndarray, row_masks: np.ndarray, *extra: np.ndarray) -> np.ndarray:
        """The ONNX model on rows [n, 2C, ny] with masks [n, 1, ny] (and, contract 2, maps
        [n, 2C, ny]); chunked if configured, averaged with the mirrored rows if reflect_average."""
        inputs = (rows, row_masks) + extra
        output = self._run_chunks(inputs)
        if self.reflect_average:
            mirrored = self._run_chunks(tuple(np.ascontiguousarray(reflect_ky(a)) for a in inputs))
            output = 0.5 * (output + reflect_ky(mirrored))
        return output

    def _run_chunks(self, inputs: tuple) -> np.ndarray:
        total = inputs[0].shape[0]
        step = self.max_rows_per_run if self.max_rows_per_run > 0 else total
        outputs = [self._run_once([np.ascontiguousarray(a[i:i + step]) for a in inputs])
                   for i in range(0, total, step)]
        return np.concatenate(outputs, axis=0)

    def _run_once(self, inputs: list) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], dict(zip(self.input_names, inputs)))[0]
        binding = self.session.io_binding()  # one per call: sessions are shared across threads
        for name, array in zip(self.input_names, inputs):
            binding.bind_cpu_input(name, array)
        binding.bind_output(self.output_name, self.output_device)
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
                    calibration: np.ndarray | None = None,
                    reference_lines: np.ndarray | None = None) -> np.ndarray:
        """Coil-combined magnitude image [ky, kx] (float32) from K[coils, ky, kx] and mask.

        mask [ky]: the contract path (1D undersampling along ky, kx fully sampled).
        calibration: reference data of this slice, either samples [coils, n] (contract 1: they
        set the coil compression) or, with reference_lines [ky], a k-space grid [coils, ky, kx]
        whose reference_lines hold the reference lines (both contracts; contract 2 calibrates its
        coil maps on them). Without it, the fully sampled centre run of the data is used.
        mask [ky, kx]: 2D undersampling, contract 1 only; the 1D model runs along both axes and
        the two k-space estimates are averaged (see reconstruct_coils_2d)."""
        mask = np.asarray(mask)
        if self.contract == "2":
            return np.abs(self.reconstruct_image(kspace, mask, calibration, reference_lines)).astype(np.float32)
        if reference_lines is not None and calibration is not None:
            calibration = np.asarray(calibration)[:, np.asarray(reference_lines, dtype=bool)]
        if mask.ndim == 2:
            images = self.reconstruct_coils_2d(kspace, mask, calibration)
        else:
            images = self.reconstruct_coils(kspace, mask, calibration)
        return root_sum_of_squares(images).astype(np.float32)

    def calibrate(self, kspace: np.ndarray, mask: np.ndarray, calibration: np.ndarray | None = None,
                  reference_lines: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Contract 2's calibration (CONTRACT.md steps 1-3): (compression matrix [V, coils],
        ESPIRiT maps [V, ky, kx]) from the reference lines; ValueError with too few of them."""
        if calibration is None or reference_lines is None:
            calibration, reference_lines = np.asarray(kspace) * np.asarray(mask)[None, :, None], calibration_lines(mask)
        run = reference_run(reference_lines)
        if run.sum() < MIN_REFERENCE_LINES:
            raise ValueError(f"the scan carries {int(run.sum())} contiguous reference lines; the "
                             f"scan-calibrated PISF model needs at least {MIN_REFERENCE_LINES} to "
                             "calibrate its coil maps")
        return compressed_maps(np.asarray(calibration)[:, run, :], np.asarray(kspace).shape[1:], self.virtual_coils)

    def reconstruct_image(self, kspace: np.ndarray, mask: np.ndarray,
                          calibration: np.ndarray | None = None,
                          reference_lines: np.ndarray | None = None,
                          maps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Contract 2: complex coil-combined image [ky, kx] of one slice (1D mask along ky).
        maps: `calibrate`'s result when the caller already has it (it is the costly step)."""
        kspace = np.asarray(kspace, dtype=np.complex64)
        mask = (np.asarray(mask) > 0.5).astype(np.float32)
        if mask.ndim != 1:
            raise ValueError("the scan-calibrated PISF model reconstructs 1D-undersampled slices "
                             f"(mask along ky); got a {mask.ndim}D mask")
        matrix, coil_maps = maps if maps is not None else self.calibrate(kspace, mask, calibration, reference_lines)
        measured = compress(kspace * mask[None, :, None], matrix)                   # [C, ky, kx]
        scale = normalisation_scale(measured, mask)
        rows = to_rows(ifftc(measured, axes=(-1,)) / scale)                         # [kx, 2C, ny]
        row_masks = np.ascontiguousarray(np.broadcast_to(mask[None, None], (rows.shape[0], 1, mask.size)))
        image = self.run_rows(rows, row_masks, to_rows(coil_maps))                 # [kx, 2, ny]
        return ((image[:, 0] + 1j * image[:, 1]).T * scale).astype(np.complex64)

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


def check_contract(session, metadata: dict, model_path) -> str:
    """The model's contract version, after checking its inputs and output against CONTRACTS."""
    name = os.path.basename(str(model_path))
    contract = str(metadata.get("contract", "1"))
    if contract not in CONTRACTS:
        raise ModelContractError(f"model {name} follows ONNX contract {contract}; this server "
                                 f"implements contracts {', '.join(CONTRACTS)} (models/CONTRACT.md)")
    inputs, output = CONTRACTS[contract]
    found_inputs = tuple(i.name for i in session.get_inputs())
    found_outputs = tuple(o.name for o in session.get_outputs())
    if found_inputs != inputs or found_outputs != (output,):
        raise ModelContractError(
            f"model {name} claims contract {contract} but has inputs {list(found_inputs)} and outputs "
            f"{list(found_outputs)}; contract {contract} needs inputs {list(inputs)} and output "
            f"{output!r} (models/CONTRACT.md)")
    return contract


def zero_filled(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RSS magnitude of the zero-filled coil images (1D mask along ky or a 2D mask)."""
    mask = np.asarray(mask, dtype=np.float32)
    full_mask = mask[None, :, None] if mask.ndim == 1 else mask[None]
    return root_sum_of_squares(ifftc(kspace * full_mask, axes=(-2, -1))).astype(np.float32)


def kspace_from_coil_images(coil_images: np.ndarray) -> np.ndarray:
    """Centred 2D FFT of coil images [coils, ny, nx]."""
    return fftc(coil_images, axes=(-2, -1)).astype(np.complex64)

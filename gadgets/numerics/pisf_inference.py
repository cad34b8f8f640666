"""PISF inference core shared by the recon gadget and `pisf evaluate` (numpy + onnxruntime only).

Implements the runtime half of models/CONTRACT.md: coil compression, normalisation, readout
iFFT, one batched ONNX run over all rows of the slice (optionally chunked), inverse scaling.
Contract 1 (calibration-free network): iFFT along ky and root-sum-of-squares of the virtual
coils. Contract 2 (scan-calibrated network): ESPIRiT maps of the virtual coils from the scan's
reference lines go in beside the data, and the network returns the coil-combined image.
Contract 3 (the same network, regulariser bank only): the same calibration, and the unrolled data
consistency runs in numpy around the bank (pisf_unrolled.py). No torch import here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .calibration import compressed_maps
from .coils import coil_compression_matrix, compress, normalisation_scale, root_sum_of_squares
from .fft import fftc, ifftc
from .pisf_unrolled import BANK_INPUTS, BANK_OUTPUT, REQUIRED_METADATA, UnrolledPisf
from .quality import coil_residual, sense_residual
from .reference import MIN_ACS_BLOCK_LINES, MIN_CALIBRATION_REFERENCE_LINES, reference_block, reference_run

# contract -> (input names, output name); models/CONTRACT.md
CONTRACTS = {"1": (("kspace", "mask"), "kspace_out"),
             "2": (("kspace", "mask", "sens"), "image"),
             "3": (BANK_INPUTS, BANK_OUTPUT)}
SCAN_CALIBRATED = ("2", "3")      # contracts that calibrate coil maps on the reference lines


class ModelContractError(ValueError):
    """The ONNX file does not follow a contract this runtime implements."""


def calibration_lines(mask: np.ndarray) -> np.ndarray:
    """Boolean [ny]: the contiguous sampled run through the centre (the ACS block) when it has at
    least MIN_ACS_BLOCK_LINES lines, otherwise every sampled line (CONTRACT.md: ACS if present)."""
    sampled = np.asarray(mask) > 0.5
    if not sampled[sampled.shape[0] // 2]:
        return sampled
    run = reference_run(sampled)                  # the run through the centre
    return run if run.sum() >= MIN_ACS_BLOCK_LINES else sampled


@dataclass
class SliceReconstruction:
    """One slice through the inference core, with what its quality signals need: the data the
    network saw and, per contract, the model in which the image explains them."""
    magnitude: np.ndarray                  # float32 [ky, kx]: the image
    mask: np.ndarray                       # float32 [ky]: the sampled lines (0 / 1)
    measured: np.ndarray                   # complex64 [V, ky, kx]: compressed k-space on them (unscaled)
    compression: np.ndarray                # [V, coils]: the coil compression applied
    image: np.ndarray | None = None        # contract 2: complex coil-combined image [ky, kx]
    maps: np.ndarray | None = None         # contract 2: ESPIRiT maps of the virtual coils [V, ky, kx]
    coil_images: np.ndarray | None = None  # contract 1: virtual-coil images [V, ky, kx]

    def data_consistency(self) -> float:
        """||M F(x) - y|| / ||y|| on the sampled lines: x the coil images S x of the model's own
        SENSE model (contract 2), or the virtual-coil images (contract 1)."""
        if self.maps is not None:
            return sense_residual(self.image, self.maps, self.measured, self.mask)
        return coil_residual(self.coil_images, self.measured, self.mask)


@dataclass
class PreparedSlice:
    """One slice after calibration, compression and normalisation: the network's inputs, rows
    first (so the rows of several slices concatenate into one batch), and what turns the
    network's output back into the image (PisfReconstructor.finish_slice)."""
    inputs: tuple[np.ndarray, ...]  # contract 1: rows [kx, 2C, ny] f32, masks [kx, 1, ny]; 2: + maps [kx, 2C, ny];
    #                                 3: measured [kx, C, ny] c64, masks [kx, ny], maps [kx, C, ny] c64
    scale: float                           # the normalisation the output is scaled back by
    mask: np.ndarray                       # float32 [ky]: the sampled lines (0 / 1)
    measured: np.ndarray                   # complex64 [V, ky, kx]: compressed k-space on them (unscaled)
    compression: np.ndarray                # [V, coils]
    maps: np.ndarray | None = None         # contracts 2 and 3: ESPIRiT maps of the virtual coils [V, ky, kx]

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def batch_key(self) -> tuple:
        """Slices with equal keys can share a batch: their per-row shapes and types agree."""
        return tuple((a.shape[1:], a.dtype.str) for a in self.inputs)


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
                 io_binding: bool = False, virtual_coils: int = 16, unrolled: dict | None = None):
        """providers: names or (name, options) pairs, in order of preference.
        virtual_coils: contract 2 compresses to at most this many coils (the graph takes any
        count; on a 16-channel in-vivo brain, 8 virtual coils cost 4-9 dB of SENSE PSNR against 12
        or 16).
        reflect_average: also run every row mirrored (k -> -k) and average the two outputs
        (test-time augmentation; doubles the inference time).
        io_binding: run through an onnxruntime IOBinding (inputs bound once, the output kept on
        the provider's device until one copy back), which saves copies on GPU providers.
        unrolled: contract 3's run-time options of UnrolledPisf (init_cg, block_cg, row_coils,
        multi_shift; absent ones keep the trained values in the metadata)."""
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
        self.scan_calibrated = self.contract in SCAN_CALIBRATED
        if unrolled and self.contract != "3":
            raise ValueError(f"options {sorted(unrolled)} apply to contract-3 models; "
                             f"{model_path} is contract {self.contract}")
        self.unrolled = (UnrolledPisf(self.session, self.metadata, max(threads, 1), **(unrolled or {}))
                         if self.contract == "3" else None)

    # ---------------------------------------------------------------- contract preprocessing
    def preprocess(self, kspace: np.ndarray, mask: np.ndarray, compression_samples: np.ndarray | None = None):
        """Contract 1: K[coils, ky, kx], mask[ky] -> (rows [kx, 2C, ny], scale, compressed masked
        K[C, ky, kx]). compression_samples [coils, ...]: the samples the coil compression is fitted
        on (default: `calibration_lines` of the data)."""
        rows, scale, measured, _ = self._contract_1_inputs(kspace, mask, compression_samples)
        return rows, scale, measured

    def _contract_1_inputs(self, kspace, mask, compression_samples):
        """preprocess's result and the compression matrix [C, coils]."""
        kspace = np.asarray(kspace, dtype=np.complex64)
        mask = (np.asarray(mask) > 0.5).astype(np.float32)
        if compression_samples is None:
            compression_samples = kspace[:, calibration_lines(mask), :]
        matrix = coil_compression_matrix(np.asarray(compression_samples, dtype=np.complex64), self.coils)
        measured = compress(kspace * mask[None, :, None], matrix)
        scale = normalisation_scale(measured, mask)
        hybrid = ifftc(measured, axes=(-1,)) / scale                     # [C, ky, x]
        return to_rows(hybrid), scale, measured, matrix

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
    # The reference data of a slice come in one of two forms, each with its own parameter:
    # reference_kspace [coils, ky, kx] with reference_lines [ky] (the scan's reference lines on the
    # k-space grid; both contracts), or compression_samples [coils, ...] (contract 1's low-level
    # calls: only the samples the coil compression is fitted on).
    # A slice goes through three steps, which a scheduler may run apart (gadgets/inference_pool.py:
    # the network step of several slices as one batch): prepare_slice (calibration, compression,
    # normalisation), run_prepared (the network), finish_slice (scale back, coil combination).
    def reconstruct_coils(self, kspace: np.ndarray, mask: np.ndarray,
                          compression_samples: np.ndarray | None = None) -> np.ndarray:
        """Contract 1: virtual-coil images [C, ky, kx] (complex64) of one slice, 1D mask along ky."""
        return self._reconstruct(self._prepare_contract_1(kspace, mask, compression_samples)).coil_images

    def _prepare_contract_1(self, kspace, mask, compression_samples) -> PreparedSlice:
        rows, scale, measured, matrix = self._contract_1_inputs(kspace, mask, compression_samples)
        ny = rows.shape[-1]
        sampled = (np.asarray(mask) > 0.5).astype(np.float32)
        row_masks = np.broadcast_to(sampled[None, None], (rows.shape[0], 1, ny)).copy()
        return PreparedSlice((rows, row_masks), scale, sampled, measured, matrix)

    def _reconstruct(self, prepared: PreparedSlice) -> SliceReconstruction:
        return self.finish_slice(prepared, self.run_prepared([prepared])[0])

    def reconstruct_slice(self, kspace: np.ndarray, mask: np.ndarray,
                          reference_kspace: np.ndarray | None = None,
                          reference_lines: np.ndarray | None = None) -> SliceReconstruction:
        """One 1D-undersampled slice K[coils, ky, kx] (mask [ky]) with its reference lines
        (reference_kspace [coils, ky, kx] whose reference_lines [ky] hold them; without them the
        fully sampled centre run of the data): the image and what its quality signals need.
        Contract 1 fits its coil compression on every reference line, contract 2 calibrates
        compression and coil maps on their run through the centre (ValueError with too few)."""
        return self._reconstruct(self.prepare_slice(kspace, mask, reference_kspace, reference_lines))

    def prepare_slice(self, kspace: np.ndarray, mask: np.ndarray, reference_kspace: np.ndarray | None = None,
                      reference_lines: np.ndarray | None = None,
                      maps: tuple[np.ndarray, np.ndarray] | None = None) -> PreparedSlice:
        """`reconstruct_slice`'s first step: the slice's network rows (ValueError where the core
        refuses the slice). maps: `calibrate`'s result when the caller already has it."""
        mask = np.asarray(mask)
        if not self.scan_calibrated:
            samples = None
            if reference_kspace is not None and reference_lines is not None:
                samples = np.asarray(reference_kspace)[:, np.asarray(reference_lines, dtype=bool)]
            return self._prepare_contract_1(kspace, mask, samples)
        return self._prepare_calibrated(kspace, mask, reference_kspace, reference_lines, maps)

    def run_prepared(self, slices: Sequence[PreparedSlice]) -> list[np.ndarray]:
        """The network on the rows of one or several prepared slices as ONE batch (chunked by
        max_rows_per_run where set); each slice's output rows, in order. Slices must share
        `batch_key`. Every row carries its own mask (and maps), and rows do not interact, so a
        slice's output does not depend on its batch mates (bit-identical on onnxruntime CPU,
        tests/test_inference_pool.py)."""
        if len(slices) == 1:
            inputs = slices[0].inputs
        else:
            inputs = tuple(np.concatenate(parts) for parts in zip(*(s.inputs for s in slices)))
        output = self.run_unrolled_rows(*inputs) if self.contract == "3" else self.run_rows(*inputs)
        return np.split(output, np.cumsum([s.rows for s in slices])[:-1])

    def finish_slice(self, prepared: PreparedSlice, output: np.ndarray) -> SliceReconstruction:
        """`reconstruct_slice`'s last step: the network's output rows of the slice -> image."""
        if self.contract == "1":
            hybrid = from_rows(output, self.coils) * prepared.scale            # [C, ky, x]
            coil_images = ifftc(hybrid, axes=(-2,))
            return SliceReconstruction(root_sum_of_squares(coil_images).astype(np.float32), prepared.mask,
                                       prepared.measured, prepared.compression, coil_images=coil_images)
        rows = output if self.contract == "3" else output[:, 0] + 1j * output[:, 1]     # [kx, ny]
        image = (rows.T * prepared.scale).astype(np.complex64)
        return SliceReconstruction(np.abs(image).astype(np.float32), prepared.mask, prepared.measured,
                                   prepared.compression, image=image, maps=prepared.maps)

    def reconstruct(self, kspace: np.ndarray, mask: np.ndarray,
                    reference_kspace: np.ndarray | None = None,
                    reference_lines: np.ndarray | None = None) -> np.ndarray:
        """Coil-combined magnitude image [ky, kx] (float32) from K[coils, ky, kx] and mask.

        mask [ky]: the contract path (1D undersampling along ky, kx fully sampled), as
        `reconstruct_slice`. mask [ky, kx]: 2D undersampling, contract 1 only; the 1D model runs
        along both axes and the two k-space estimates are averaged (see reconstruct_coils_2d)."""
        mask = np.asarray(mask)
        if mask.ndim == 2 and not self.scan_calibrated:
            samples = None
            if reference_kspace is not None and reference_lines is not None:
                samples = np.asarray(reference_kspace)[:, np.asarray(reference_lines, dtype=bool)]
            return root_sum_of_squares(self.reconstruct_coils_2d(kspace, mask, samples)).astype(np.float32)
        return self.reconstruct_slice(kspace, mask, reference_kspace, reference_lines).magnitude

    def calibrate(self, kspace: np.ndarray, mask: np.ndarray, reference_kspace: np.ndarray | None = None,
                  reference_lines: np.ndarray | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
        """Contract 2's calibration (CONTRACT.md steps 1-3): (compression matrix [V, coils],
        ESPIRiT maps [V, ky, kx]) from the reference block; ValueError with too few lines.
        options: `espirit_maps`' (maps="auto": [2, V, ky, kx] where the object folds, for the guard)."""
        block, lines, _ = reference_block(kspace, mask, reference_kspace, reference_lines)
        if lines < MIN_CALIBRATION_REFERENCE_LINES:
            raise ValueError(f"the scan carries {lines} contiguous reference lines; the "
                             f"scan-calibrated PISF model needs at least {MIN_CALIBRATION_REFERENCE_LINES} to "
                             "calibrate its coil maps")
        return compressed_maps(block, np.asarray(kspace).shape[1:], self.virtual_coils, **options)

    def reconstruct_image(self, kspace: np.ndarray, mask: np.ndarray,
                          reference_kspace: np.ndarray | None = None,
                          reference_lines: np.ndarray | None = None,
                          maps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Contract 2: complex coil-combined image [ky, kx] of one slice (1D mask along ky).
        maps: `calibrate`'s result when the caller already has it (it is the costly step)."""
        return self._reconstruct(self._prepare_calibrated(kspace, mask, reference_kspace, reference_lines,
                                                          maps)).image

    def _prepare_calibrated(self, kspace, mask, reference_kspace, reference_lines, maps=None) -> PreparedSlice:
        """Contracts 2 and 3 (CONTRACT.md): calibrate, compress, normalise; the rows to run."""
        kspace = np.asarray(kspace, dtype=np.complex64)
        mask = (np.asarray(mask) > 0.5).astype(np.float32)
        if mask.ndim != 1:
            raise ValueError("the scan-calibrated PISF model reconstructs 1D-undersampled slices "
                             f"(mask along ky); got a {mask.ndim}D mask")
        matrix, coil_maps = maps if maps is not None else self.calibrate(kspace, mask, reference_kspace,
                                                                         reference_lines)
        measured = compress(kspace * mask[None, :, None], matrix)                   # [C, ky, kx]
        scale = normalisation_scale(measured, mask)
        hybrid = ifftc(measured, axes=(-1,)) / scale
        if self.contract == "3":
            rows = np.ascontiguousarray(hybrid.transpose(2, 0, 1), dtype=np.complex64)       # [kx, C, ky]
            row_masks = np.ascontiguousarray(np.broadcast_to(mask, (rows.shape[0], mask.size)))
            inputs = (rows, row_masks, np.ascontiguousarray(coil_maps.transpose(2, 0, 1), dtype=np.complex64))
        else:
            rows = to_rows(hybrid)                                                   # [kx, 2C, ny]
            row_masks = np.ascontiguousarray(np.broadcast_to(mask[None, None], (rows.shape[0], 1, mask.size)))
            inputs = (rows, row_masks, to_rows(coil_maps))
        return PreparedSlice(inputs, scale, mask, measured, matrix, coil_maps)

    def run_unrolled(self, hybrid: np.ndarray, mask: np.ndarray, coil_maps: np.ndarray) -> np.ndarray:
        """Contract 3: image rows [kx, ny] (complex64) from normalised hybrid data [C, ky, kx],
        mask [ky] and maps [C, ky, kx] (see run_unrolled_rows)."""
        rows = np.ascontiguousarray(hybrid.transpose(2, 0, 1), dtype=np.complex64)     # [kx, C, ky]
        maps = np.ascontiguousarray(coil_maps.transpose(2, 0, 1), dtype=np.complex64)
        return self.run_unrolled_rows(rows, np.asarray(mask, dtype=np.float32), maps)

    def run_unrolled_rows(self, rows: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """Contract 3: image rows [n, ny] (complex64) from measured rows [n, C, ny], masks [ny] or
        per row [n, ny], maps [n, C, ny]; all rows in one batch unless max_rows_per_run is set,
        averaged with the mirrored rows if reflect_average."""
        step = self.max_rows_per_run if self.max_rows_per_run > 0 else rows.shape[0]

        def run(rows, masks, maps):
            return np.concatenate([self.unrolled.run(rows[i:i + step], masks[i:i + step] if masks.ndim == 2 else masks,
                                                     maps[i:i + step])
                                   for i in range(0, rows.shape[0], step)])
        image = run(rows, masks, maps)
        if self.reflect_average:
            mirrored = run(*(np.ascontiguousarray(reflect_ky(a)) for a in (rows, masks, maps)))
            image = 0.5 * (image + reflect_ky(mirrored))
        return image

    def reconstruct_coils_2d(self, kspace: np.ndarray, mask2d: np.ndarray,
                             compression_samples: np.ndarray | None = None,
                             per_row_scale: bool = True) -> np.ndarray:
        """2D-undersampled K[coils, ky, kx] with mask2d[ky, kx] (no axis fully sampled).

        Every k-space line along one axis is a 1D problem with its own mask (the mask column or
        row), the other axis staying in k-space; the estimates along ky and along kx are
        averaged, then both axes are inverse transformed. Because lines far from the centre
        carry little energy, each line is scaled by its own zero-filled max when
        per_row_scale (the network is not scale-equivariant)."""
        kspace = np.asarray(kspace, dtype=np.complex64)
        mask2d = (np.asarray(mask2d) > 0.5).astype(np.float32)
        if compression_samples is None:
            cal_y = calibration_lines(mask2d[:, mask2d.shape[1] // 2])
            cal_x = calibration_lines(mask2d[mask2d.shape[0] // 2, :])
            compression_samples = kspace[:, cal_y][:, :, cal_x]
        matrix = coil_compression_matrix(np.asarray(compression_samples, dtype=np.complex64), self.coils)
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
    missing = [key for key in REQUIRED_METADATA if key not in metadata] if contract == "3" else []
    if missing:
        raise ModelContractError(f"model {name} claims contract 3 but its metadata lacks {missing} "
                                 "(the data consistency's scalars; models/CONTRACT.md)")
    return contract


def zero_filled(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RSS magnitude of the zero-filled coil images (1D mask along ky or a 2D mask)."""
    mask = np.asarray(mask, dtype=np.float32)
    full_mask = mask[None, :, None] if mask.ndim == 1 else mask[None]
    return root_sum_of_squares(ifftc(kspace * full_mask, axes=(-2, -1))).astype(np.float32)


def kspace_from_coil_images(coil_images: np.ndarray) -> np.ndarray:
    """Centred 2D FFT of coil images [coils, ny, nx]."""
    return fftc(coil_images, axes=(-2, -1)).astype(np.complex64)

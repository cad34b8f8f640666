"""PISF reconstruction gadget: the shipped ONNX network on every readout row of a slice.

Accelerations and masks come from the data (which lines were sampled, which were ACS), never
from configuration. One onnxruntime session per (model, providers, threads) per process,
created and warmed up when the server starts and shared by all connections (onnxruntime
sessions are safe to run from several threads).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from .context import InputError, StreamContext
from .items import KSpaceSlice, ReconImage
from .numerics.pisf_inference import PisfReconstructor

log = logging.getLogger("pisf.gadget")
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

_sessions: dict[tuple, PisfReconstructor] = {}
_sessions_lock = threading.Lock()


def resolve_model(model: str | Path) -> Path:
    """A model path as given (absolute, or relative to the working directory), else under models/."""
    path = Path(model)
    if not path.is_absolute() and not path.is_file():
        path = MODELS_DIR / path
    if not path.is_file():
        raise FileNotFoundError(f"PISF model {str(model)!r} not found (looked at {path})")
    return path


def available_providers(requested) -> list[str]:
    """Requested providers that this onnxruntime build offers, CPU always last as fallback."""
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    chosen = [p for p in requested if p in offered and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def provider_options(providers: list[str], fp16: bool) -> list:
    """(name, options) pairs; fp16 is a TensorRT build option (CUDA and CPU run the fp32 graph)."""
    return [(name, {"trt_fp16_enable": True} if fp16 and name == "TensorrtExecutionProvider" else {})
            for name in providers]


def shared_reconstructor(model: str | Path, providers=DEFAULT_PROVIDERS, threads: int = 0,
                         max_rows_per_run: int = 0, io_binding: bool | str = "auto",
                         fp16: bool = False) -> PisfReconstructor:
    """The process-wide session for this model and settings, created (and warmed up) once.

    io_binding "auto": on when a GPU provider is in use (saves host/device copies)."""
    path = resolve_model(model)
    chosen = available_providers(providers)
    if io_binding == "auto":
        io_binding = chosen[0] != "CPUExecutionProvider"
    key = (str(path), tuple(chosen), int(threads), int(max_rows_per_run), bool(io_binding), bool(fp16))
    with _sessions_lock:
        reconstructor = _sessions.get(key)
        if reconstructor is None:
            started = time.perf_counter()
            try:
                reconstructor = PisfReconstructor(path, providers=provider_options(chosen, fp16), threads=threads,
                                                  max_rows_per_run=max_rows_per_run, io_binding=bool(io_binding))
            except Exception as exc:  # onnxruntime reports corrupt files with its own types
                raise RuntimeError(f"PISF model {path.name} could not be loaded: {exc}") from None
            _warm_up(reconstructor)
            log.info("PISF model %s (%s, %d virtual coils) on %s, loaded and warmed up in %.2f s",
                     path.name, reconstructor.variant, reconstructor.coils,
                     reconstructor.session.get_providers()[0], time.perf_counter() - started)
            _sessions[key] = reconstructor
    return reconstructor


def _warm_up(reconstructor: PisfReconstructor) -> None:
    """One small inference so the first scan does not pay for lazy initialisation."""
    ny, rows = 64, 16
    rng = np.random.default_rng(0)
    kspace = (rng.standard_normal((reconstructor.coils, ny, rows))
              + 1j * rng.standard_normal((reconstructor.coils, ny, rows))).astype(np.complex64)
    mask = np.zeros(ny, np.float32)
    mask[::2] = 1
    mask[ny // 2 - 4:ny // 2 + 4] = 1
    reconstructor.reconstruct(kspace, mask)


def calibration_mode(header) -> str | None:
    parallel = header.encoding[0].parallelImaging
    mode = getattr(parallel, "calibrationMode", None) if parallel is not None else None
    return getattr(mode, "value", mode)


class PisfRecon:
    """KSpaceSlice -> ReconImage with the PISF network (2D slices, 1D undersampling along ky)."""

    def __init__(self, context: StreamContext, model: str = "pisf_fast.onnx",
                 providers: list[str] | tuple[str, ...] = DEFAULT_PROVIDERS, threads: int = 0,
                 max_rows_per_run: int = 0, acs_as_data: str | bool = "auto", io_binding: bool | str = "auto",
                 fp16: bool = False):
        self.context = context
        # Embedded ACS lines are measured k-space of this very slice: data consistency should keep
        # them. Separate or interleaved references may differ (resolution, time), so by default
        # they only calibrate the coil compression.
        if acs_as_data == "auto":
            acs_as_data = calibration_mode(context.header) == "embedded"
        self.acs_as_data = bool(acs_as_data)
        self.reconstructor = shared_reconstructor(model, providers, threads, max_rows_per_run, io_binding, fp16)
        self.model_name = resolve_model(model).name
        self.provider = self.reconstructor.session.get_providers()[0]

    @staticmethod
    def warm_up(model: str = "pisf_fast.onnx", providers=DEFAULT_PROVIDERS, threads: int = 0,
                max_rows_per_run: int = 0, io_binding: bool | str = "auto", fp16: bool = False,
                **_ignored) -> None:
        shared_reconstructor(model, providers, threads, max_rows_per_run, io_binding, fp16)

    def __call__(self, items):
        for item in items:
            if isinstance(item, KSpaceSlice):
                yield self._reconstruct(item)
            else:
                yield item

    def _reconstruct(self, item: KSpaceSlice) -> ReconImage:
        if item.kspace.shape[1] != 1:
            raise InputError(f"{item.key}: the PISF chain reconstructs 2D slices; this scan is 3D "
                             f"({item.kspace.shape[1]} partitions)")
        started = time.perf_counter()
        kspace = item.kspace[:, 0]                      # [coils, ky, kx]
        sampled = item.sampled[0]                       # [ky]: lines acquired as image data
        if self.acs_as_data and item.calibration is not None:
            acs_only = item.calibration_sampled[0] & ~sampled
            kspace = kspace.copy()
            kspace[:, acs_only] = item.calibration[:, 0][:, acs_only]
            sampled = sampled | acs_only
        mask = sampled.astype(np.float32)
        # Without reference lines the inference core picks the fully sampled centre run itself.
        calibration = lines = None
        if item.calibration is not None and item.calibration_sampled.any():
            calibration, lines = item.calibration[:, 0], item.calibration_sampled[0]
        image = self.reconstructor.reconstruct(kspace, mask, calibration, lines)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        acceleration = mask.size / max(mask.sum(), 1.0)
        return ReconImage(key=item.key, data=image[None], reference=item.reference,
                          recon=f"PISF {self.reconstructor.variant} ({self.model_name}), R {acceleration:.1f}",
                          meta={"PISF_Model": self.model_name, "PISF_Provider": self.provider,
                                "PISF_InferenceMs": f"{elapsed_ms:.1f}",
                                "PISF_Acceleration": f"{acceleration:.2f}"},
                          complete=item.complete, last_line_time=item.last_line_time)

"""PISF reconstruction gadget: the shipped ONNX network on every readout row of a slice.

Accelerations and masks come from the data (which lines were sampled, which were ACS), never
from configuration. One onnxruntime session per (model, providers, threads) per process,
created and warmed up when the server starts and shared by all connections (onnxruntime
sessions are safe to run from several threads).

Before the network runs, a model-range guard checks each slice against the model's metadata and
reconstructs it with a classical method (gadgets/classical.py) when it is outside; every image
says which method made it, and PISF images carry quality signals (see PisfRecon).

Slices in flight (gadgets/inference_pool.py): a slice takes one of the server's slots (at most
`max_slices_in_flight` in all connections together; a stage waits for one, which pushes its
client back through TCP), is prepared (calibration, compression, normalisation) in its
connection, then joins the model's inference queue; one worker per model session runs the rows
of every queued slice (up to `max_rows_per_batch` rows) as one batch. With `slices_ahead` > 1 a
stream starts its next slices while earlier ones are in the network (so one scanner's queued
slices share batches too); images leave in stream order. A slice whose client has gone is not
started, and is dropped from the queue.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .classical import CHOICES, METHODS, SERIES, classical_options, reconstruct_classical, sense_2d_image
from .context import StreamCancelled, StreamContext
from .finish import SERIES_META
from .inference_pool import ADMISSION, POLL_S, Cancelled, InferenceScheduler
from .items import KSpaceSlice, Notice, ReconImage
from .numerics.pisf_inference import SCAN_CALIBRATED, PisfReconstructor, PreparedSlice
from .numerics.quality import normalised_difference
from .numerics.reference import MIN_CALIBRATION_REFERENCE_LINES
from .reference_prep import CalibrationRecipe, CalibrationUse, declare_recipe, prepared_calibration
from .numerics.sampling import sampling_of
from .slices import SliceData, acs_as_data_default, partitions

log = logging.getLogger("pisf.gadget")
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

DEFAULT_MAX_ROWS_PER_BATCH = 256     # on CPU only small slices gain from sharing a run (config/pisf.yaml)

_END_OF_ITEMS = object()

_sessions: dict[tuple, PisfReconstructor] = {}
_schedulers: dict[tuple, InferenceScheduler] = {}
_sessions_lock = threading.Lock()
_declared_limits: list[int] = []     # max_slices_in_flight of the chains warmed up (the smallest wins)


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


def shared_scheduler(reconstructor: PisfReconstructor, max_rows_per_batch: int = DEFAULT_MAX_ROWS_PER_BATCH
                     ) -> InferenceScheduler:
    """The process-wide inference queue of this session and row budget (its worker thread starts
    with the first slice)."""
    key = (reconstructor, int(max_rows_per_batch))

    def run_batch(prepared):
        outputs = reconstructor.run_prepared(prepared)
        return [(output, len(prepared)) for output in outputs]   # each slice learns its batch size
    with _sessions_lock:
        scheduler = _schedulers.get(key)
        if scheduler is None:
            scheduler = _schedulers[key] = InferenceScheduler(run_batch, max_rows_per_batch,
                                                              name=f"pisf-inference-{len(_schedulers) + 1}")
    return scheduler


def declare_max_slices_in_flight(limit: int) -> None:
    """A chain's max_slices_in_flight, at server start (warm-up): the server-wide bound becomes the
    smallest any chain declares (`pisf serve --max-slices-in-flight` is applied after, and wins)."""
    with _sessions_lock:
        _declared_limits.append(int(limit))
        ADMISSION.set_limit(min(_declared_limits))


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


# --------------------------------------------------------------------------- model-range guard
RANGE_KEYS = {"acceleration": ("trained_acceleration_min", "trained_acceleration_max"),
              "ny": ("trained_ny_min", "trained_ny_max")}


def trained_ranges(metadata: dict) -> dict[str, tuple[float, float]]:
    """{"acceleration": (lo, hi), "ny": (lo, hi)} for the ranges the model's ONNX metadata
    carries (tools/export.py `trained_ranges`); empty for models without them (contract 1)."""
    ranges = {}
    for name, (lo_key, hi_key) in RANGE_KEYS.items():
        try:
            ranges[name] = (float(metadata[lo_key]), float(metadata[hi_key]))
        except (KeyError, TypeError, ValueError):
            continue
    return ranges


def guard_reasons(data: SliceData, partitions: int, reconstructor: PisfReconstructor,
                  trajectory: str | None) -> list[tuple[str, str]]:
    """Why this slice is outside what the model was trained for, as (guard, text) pairs (empty:
    inside). Checks, in order: Cartesian 2D, reference lines (contract 2 calibrates its coil maps on them),
    acceleration and row length against the trained ranges in the model metadata, receive coils
    against the model's (virtual) coil count (`trained_coils_min` where the metadata has it)."""
    reasons = []
    if trajectory not in (None, "cartesian"):
        reasons.append(("trajectory", f"{trajectory} trajectory; the model reconstructs Cartesian data"))
    if partitions > 1:
        reasons.append(("3D", f"3D scan ({partitions} partitions); the model reconstructs 2D slices"))
    if reconstructor.contract in SCAN_CALIBRATED:
        _, lines, _ = data.reference_block()
        if lines < MIN_CALIBRATION_REFERENCE_LINES:
            reasons.append(("reference lines", f"{lines} contiguous reference lines; the model calibrates its "
                                                f"coil maps on at least {MIN_CALIBRATION_REFERENCE_LINES}"))
    ranges = trained_ranges(reconstructor.metadata)
    if "acceleration" in ranges:
        lo, hi = ranges["acceleration"]
        if not lo <= data.acceleration <= hi:
            reasons.append(("acceleration",
                            f"acceleration R {data.acceleration:.2f} outside the trained range {lo:g}-{hi:g}"))
    if "ny" in ranges:
        lo, hi = ranges["ny"]
        if not lo <= data.ny <= hi:
            reasons.append(("rows", f"{data.ny} phase-encoding lines outside the trained range {lo:g}-{hi:g}"))
    metadata = reconstructor.metadata
    try:
        needed = int(metadata.get("trained_coils_min", metadata.get("coils", 0)))
    except ValueError:
        needed = 0
    if data.coils < needed:
        reasons.append(("coils", f"{data.coils} receive channels; the model was trained with {needed} (virtual) coils"))
    else:
        limit = coil_acceleration_limit(metadata, data.coils)
        if limit is not None and data.acceleration > limit[1] + 0.05:   # R from line counts: rounding
            reasons.append(("coils", f"{data.coils} receive channels at R {data.acceleration:.2f}; the model was "
                                     f"trained with {limit[0]}-channel arrays up to R {limit[1]:g}"))
    return reasons


FOLDED_REASON = ("the object is larger than the field of view along phase encoding (a second ESPIRiT "
                 "map carries signal); the model was trained with one map")


def coil_acceleration_limit(metadata: dict, coils: int) -> tuple[int, float] | None:
    """(channels, highest trained R) of the `trained_coil_acceleration` entry ("channels:R,...",
    tools/training/export.py) that covers a slice with `coils` channels: the largest channel
    count <= coils. None where the metadata has no such table (models before v3)."""
    try:
        table = sorted((int(c), float(r)) for c, r in
                       (entry.split(":") for entry in str(metadata["trained_coil_acceleration"]).split(",")))
    except (KeyError, ValueError):
        return None
    covering = [entry for entry in table if entry[0] <= coils]
    return covering[-1] if covering else None


@dataclass
class _StartedSlice:
    """A slice between the stage's two halves (PisfRecon._start, PisfRecon._complete)."""
    item: KSpaceSlice
    at: float                                   # perf_counter when the stage took the slice
    planes: list[SliceData]
    reasons: list[tuple[str, str]] = field(default_factory=list)   # why the fallback makes its image
    prepared: PreparedSlice | None = None
    prepared_at: float = 0.0
    future: Future | None = None                # the network's (output rows, batch size)
    calibration: CalibrationUse | None = None   # reference_prep's, where it prepared the slice
    ready: list | None = None                   # outputs made in _start (a 2D-undersampled slice's 2D SENSE)


class PisfRecon:
    """KSpaceSlice -> ReconImage with the PISF network (2D slices, 1D undersampling along ky).

    Before the network runs, the model-range guard (`guard_reasons`) checks the slice against
    the model's metadata; outside it the slice is reconstructed by `fallback` (classical: GRAPPA or SENSE by the
    slice's geometry, as the `classical` chain; or grappa or sense),
    the client gets a TEXT warning naming why, and the image meta names the method
    (PISF_Method, PISF_Guard); `sense_regulariser` (l2 or l1) applies to the sense images it
    makes. `side_by_side` (grappa or sense) also sends the classical image
    of every slice as its own series (`side_by_side_series_index`, default 3 for grappa, 4 for
    sense). Quality signals in the meta: PISF_DataConsistency (||M F(S x) - y|| / ||y|| on the
    measured lines) and, side by side, PISF_DiffToClassical (normalised difference).

    max_rows_per_batch: rows of queued slices (of all connections) run as one batch (0: each
    slice alone). slices_ahead: slices of this stream between their start and their image (1:
    one at a time; more: the next ones are prepared and queued for the network meanwhile, in a
    helper thread of the stream). max_slices_in_flight is a server setting, read when the server starts
    (`declare_max_slices_in_flight`); per stream (a client's JSON or chain text) it is ignored."""

    def __init__(self, context: StreamContext, model: str = "pisf_v3.onnx",
                 providers: list[str] | tuple[str, ...] = DEFAULT_PROVIDERS, threads: int = 0,
                 max_rows_per_run: int = 0, acs_as_data: str | bool = "auto", io_binding: bool | str = "auto",
                 fp16: bool = False, fallback: str = "classical", side_by_side: str | None = None,
                 side_by_side_series_index: int | None = None, sense_regulariser: str = "l2",
                 max_rows_per_batch: int = DEFAULT_MAX_ROWS_PER_BATCH, max_slices_in_flight: int | None = None,
                 slices_ahead: int = 1):
        self.context = context
        if int(slices_ahead) < 1:
            raise ValueError(f"slices_ahead must be at least 1, not {slices_ahead}")
        self.slices_ahead = int(slices_ahead)
        # Embedded ACS lines are measured k-space of this very slice: data consistency should keep
        # them. Separate or interleaved references may differ (resolution, time), so by default
        # they only calibrate.
        self.acs_as_data = acs_as_data_default(context, acs_as_data)
        if fallback not in CHOICES:
            raise ValueError(f"fallback must be one of {', '.join(CHOICES)}, not {fallback!r}")
        if side_by_side in ("none", "", False):
            side_by_side = None
        if side_by_side is not None and side_by_side not in METHODS:
            raise ValueError(f"side_by_side must be none or one of {', '.join(METHODS)}, not {side_by_side!r}")
        self.fallback, self.side_by_side = fallback, side_by_side
        self.side_series = int(side_by_side_series_index if side_by_side_series_index is not None
                               else SERIES.get(side_by_side or "", 3))
        self.reconstructor = shared_reconstructor(model, providers, threads, max_rows_per_run, io_binding, fp16)
        self.scheduler = shared_scheduler(self.reconstructor, max_rows_per_batch)
        self.model_name = resolve_model(model).name
        self.provider = self.reconstructor.session.get_providers()[0]
        self.options = classical_options(None, "sense", virtual_coils=self.reconstructor.virtual_coils,
                                         sense_regulariser=str(sense_regulariser))
        encoding = context.header.encoding[0]
        trajectory = getattr(encoding, "trajectory", None)
        self.trajectory = str(getattr(trajectory, "value", trajectory)) if trajectory is not None else None
        self.ranges = trained_ranges(self.reconstructor.metadata)
        self.announced: set[str] = set()
        # what PisfReconstructor.calibrate computes: a reference_prep stage may prepare it ahead
        self.recipe = (CalibrationRecipe(self.reconstructor.virtual_coils, maps="auto")
                       if self.reconstructor.contract in SCAN_CALIBRATED else None)
        if self.recipe is not None:
            declare_recipe(context, self.recipe)

    @staticmethod
    def warm_up(model: str = "pisf_v3.onnx", providers=DEFAULT_PROVIDERS, threads: int = 0,
                max_rows_per_run: int = 0, io_binding: bool | str = "auto", fp16: bool = False,
                max_rows_per_batch: int = DEFAULT_MAX_ROWS_PER_BATCH, max_slices_in_flight: int | None = None,
                **_ignored) -> None:
        if max_slices_in_flight is not None:
            declare_max_slices_in_flight(max_slices_in_flight)
        shared_scheduler(shared_reconstructor(model, providers, threads, max_rows_per_run, io_binding, fp16),
                         max_rows_per_batch)

    def __call__(self, items):
        if self.slices_ahead > 1:
            yield from self._pipelined(items)
            return
        for item in items:
            if isinstance(item, KSpaceSlice):
                yield from self._complete(self._start(item, self.context.is_cancelled))
            else:
                yield item

    def _pipelined(self, items):
        """Items in, outputs out in the same order, with up to `slices_ahead` slices of this stream
        started (slot, preparation, network queue) by a helper thread while the slices before them
        finish here: a stream's queued slices share network batches, and a slice's preparation
        overlaps the network run of the one before. The helper runs the stages upstream too, and
        takes the next item only while the server has a free slot or this stream has nothing in
        flight: under load a stream holds no more slices than one at a time would. An error
        upstream reaches the chain after the outputs of the items before it."""
        ahead: queue.Queue = queue.Queue()
        stop = threading.Event()
        room = threading.Condition()
        in_flight = [0]            # slices of this stream started and not yet out

        def cancelled() -> bool:
            return stop.is_set() or self.context.is_cancelled()

        def may_take_next() -> bool:
            return in_flight[0] == 0 or (in_flight[0] < self.slices_ahead and ADMISSION.in_flight < ADMISSION.limit)

        def produce():
            try:
                upstream = iter(items)
                while True:
                    with room:
                        while not may_take_next():
                            if stop.is_set():
                                return
                            room.wait(POLL_S)     # woken when a slice of ours is out; slots polled
                    item = next(upstream, _END_OF_ITEMS)
                    if item is _END_OF_ITEMS:
                        ahead.put(("end", None))
                        return
                    if isinstance(item, KSpaceSlice):
                        with room:
                            in_flight[0] += 1
                        ahead.put(("slice", self._start(item, cancelled)))
                    else:
                        ahead.put(("item", item))
                    if stop.is_set():
                        return
            except BaseException as exc:   # delivered in order; the chain reports it
                ahead.put(("error", exc))

        helper = threading.Thread(target=produce, name=f"{threading.current_thread().name}-ahead", daemon=True)
        helper.start()
        try:
            while True:
                kind, value = ahead.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                if kind == "item":
                    yield value
                    continue
                try:
                    yield from self._complete(value)
                finally:
                    with room:
                        in_flight[0] -= 1
                        room.notify()
        finally:
            stop.set()   # the chain stopped early: the helper ends at its next step

    def _announce(self, text: str, key=None):
        """A TEXT for the client, once per stream and key (default: the text)."""
        key = text if key is None else key
        if key not in self.announced:
            self.announced.add(key)
            yield Notice(text)

    def _start(self, item: KSpaceSlice, cancelled) -> "_StartedSlice":
        """A slice's first half, which may run ahead of the images before it: the guard, then a
        slot among the server's slices in flight (waits while the server is at its bound), the
        preparation, and the network queue. InputError for kz-undersampled 3D, StreamCancelled
        when the client has gone."""
        self.context.check_cancelled(f"{item.key}")
        sampling = sampling_of(item.kspace)
        if sampling.holes_in_lines and item.kspace.shape[1] == 1:
            return self._two_dimensional(item, sampling)
        started = _StartedSlice(item, time.perf_counter(), partitions(item, self.acs_as_data, sampling))
        data = started.planes[0]
        started.reasons = guard_reasons(data, len(started.planes), self.reconstructor, self.trajectory)
        if started.reasons:
            return started
        try:
            slot = ADMISSION.acquire(cancelled)
        except Cancelled as exc:
            raise StreamCancelled(str(exc)) from None
        try:
            started.prepared_at = time.perf_counter()
            calibration = started.calibration = prepared_calibration(item, self.recipe)
            pair = (calibration.maps_pair if calibration is not None else
                    self.reconstructor.calibrate(data.kspace, data.mask, data.reference_kspace, data.reference_lines,
                                                 maps="auto") if self.reconstructor.scan_calibrated else None)
            if pair is not None and pair[1].ndim == 4:     # two ESPIRiT maps carry signal: the model takes one
                slot.release()
                started.reasons = [("folded", FOLDED_REASON)]
                return started
            ready = {"maps": pair} if pair is not None else {}
            started.prepared = self.reconstructor.prepare_slice(data.kspace, data.mask, data.reference_kspace,
                                                                data.reference_lines, **ready)
            self.context.check_cancelled("the network run of this slice")
            started.future = self.scheduler.submit(started.prepared, started.prepared.rows,
                                                   started.prepared.batch_key, cancelled, slot)
        except ValueError as exc:     # the inference core refuses what it cannot reconstruct
            slot.release()
            started.reasons = [("refused", f"the PISF model refused the slice: {exc}")]
        except BaseException:
            slot.release()
            raise
        return started

    def _two_dimensional(self, item: KSpaceSlice, sampling) -> "_StartedSlice":
        """Holes inside the lines (2D mask): the network solves 1D problems along ky, so the slice
        goes to 2D CG-SENSE whatever `fallback` says (GRAPPA is row-wise too); never a guard pass."""
        why = f"{sampling.describe()}; the network solves one 1D problem per readout row"
        image = sense_2d_image(item, sampling, self.options.virtual_coils, prefix="PISF not used: ",
                               extra={"PISF_Guard": f"fallback: {why}", "PISF_Model": self.model_name})
        notice = list(self._announce(f"PISF not used for {item.key}: {why}; reconstructed with 2D SENSE instead "
                                     "(further such slices are not announced)", key=("fallback", "2D")))
        return _StartedSlice(item, time.perf_counter(), [], ready=notice + [image])

    def _complete(self, started: "_StartedSlice"):
        """A slice's second half, in stream order: its network result (or the fallback) -> images."""
        item = started.item
        if started.ready is not None:
            yield from started.ready
            return
        if not self.ranges:
            yield from self._announce(
                f"model {self.model_name} carries no trained ranges in its metadata (contract "
                f"{self.reconstructor.contract}): acceleration and row length are not checked against "
                "what it was trained for")
        data = started.planes[0]
        pisf = None
        if started.future is not None:
            try:
                pisf = self._pisf(data, started)
            except ValueError as exc:
                started.reasons = [("refused", f"the PISF model refused the slice: {exc}")]
        if started.reasons:
            yield from self._fall_back(item, started.planes, started.reasons, started.at)
            return
        magnitude, meta, maps = pisf
        meta["PISF_ReconMs"] = f"{(time.perf_counter() - started.at) * 1e3:.1f}"
        side = None
        if self.side_by_side:
            side = reconstruct_classical(data, self.side_by_side, self.options,
                                         maps=maps if self.side_by_side == "sense" else None)
            meta["PISF_DiffToClassical"] = f"{normalised_difference(magnitude, side.magnitude):.4f}"
            meta["PISF_ClassicalMethod"] = side.meta["PISF_Method"]
        yield ReconImage(key=item.key, data=magnitude[None], line_header=item.line_header,
                         recon=f"PISF {self.reconstructor.variant} ({self.model_name}), R {data.acceleration:.1f}",
                         meta=meta, complete=item.complete, last_line_time=item.last_line_time)
        if side is not None:
            yield self._classical_image(item, [side], series=self.side_series)

    def _pisf(self, data: SliceData, started: "_StartedSlice"):
        """(magnitude [ny, nx], meta, (compression, maps) or None) of the network on one slice,
        with the data-consistency residual of its image on the measured lines. The inference core
        calibrates and compresses once and hands back what the residual needs; contract 2's maps
        also serve a side-by-side SENSE image. PISF_InferenceMs: preparation to image, waits for
        the network queue included."""
        _, lines, _ = data.reference_block()
        clock = time.perf_counter
        try:
            output, batch_slices = started.future.result()
        except Cancelled as exc:
            raise StreamCancelled(str(exc)) from None
        result = self.reconstructor.finish_slice(started.prepared, output)
        t1 = clock()
        residual = result.data_consistency()
        inference, signals = t1 - started.prepared_at, clock() - t1
        maps = (result.compression, result.maps) if result.maps is not None else None
        magnitude = result.magnitude
        ranges = ", ".join(f"{name} {lo:g}-{hi:g}" for name, (lo, hi) in self.ranges.items())
        meta = {"PISF_Method": "PISF", "PISF_Model": self.model_name, "PISF_Provider": self.provider,
                "PISF_Acceleration": f"{data.acceleration:.2f}", "PISF_ReferenceLines": str(lines),
                "PISF_DataConsistency": f"{residual:.4f}",
                "PISF_InferenceMs": f"{inference * 1e3:.1f}", "PISF_SignalsMs": f"{signals * 1e3:.1f}",
                "PISF_BatchSlices": str(batch_slices),
                "PISF_Guard": (f"pass (trained ranges: {ranges})" if ranges
                               else "pass (model metadata has no trained ranges: acceleration and row "
                                    "length unchecked)")}
        if started.calibration is not None:
            meta.update(started.calibration.meta(started.item.first_line_time))
        return magnitude, meta, maps

    def _fall_back(self, item: KSpaceSlice, planes: list[SliceData], reasons: list[tuple[str, str]],
                   started: float):
        why = "; ".join(text for _, text in reasons)
        results = [reconstruct_classical(plane, self.fallback, self.options) for plane in planes]
        used = results[0].meta["PISF_Method"]
        # one TEXT per kind of reason and method (every image's meta has the slice's own reason)
        yield from self._announce(f"PISF not used for {item.key}: {why}; reconstructed with {used} instead "
                                  "(further slices failing the same checks are not announced)",
                                  key=("fallback", used) + tuple(guard for guard, _ in reasons))
        if results[0].note:
            yield from self._announce(f"{item.key}: {results[0].note}", key=("note", results[0].method))
        image = self._classical_image(item, results, series=None,
                                      extra={"PISF_Guard": f"fallback: {why}", "PISF_Model": self.model_name},
                                      prefix="PISF not used: ")
        image.meta["PISF_ReconMs"] = f"{(time.perf_counter() - started) * 1e3:.1f}"
        yield image
        if self.side_by_side:
            side = (results if self.side_by_side in (self.fallback, results[0].method)
                    else [reconstruct_classical(plane, self.side_by_side, self.options) for plane in planes])
            yield self._classical_image(item, side, series=self.side_series)

    def _classical_image(self, item: KSpaceSlice, results: list, series: int | None, extra: dict | None = None,
                         prefix: str = "") -> ReconImage:
        first = results[0]
        meta = dict(first.meta)
        meta.update(extra or {})
        if series is not None:
            meta[SERIES_META] = str(series)
        return ReconImage(key=item.key, data=np.stack([r.magnitude for r in results]), line_header=item.line_header,
                          recon=f"{prefix}{first.description}, R {float(first.meta['PISF_Acceleration']):.1f}",
                          meta=meta, complete=item.complete, last_line_time=item.last_line_time)

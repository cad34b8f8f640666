"""Reference preparation, a stage beside the reconstruction (as Gadgetron's
GenericReconCartesianReferencePrepGadget): the calibration of a slice position (coil compression
+ ESPIRiT maps, `CalibrationRecipe`) is computed once per reference and handed to every image
that calibrates on the same reference data.

- A separate reference scan (header calibrationMode `separate`; Siemens sends every slice's
  reference lines before the image lines): the slice accumulator emits each slice position's
  lines as a ReferenceData item as soon as they are complete, and this stage starts their
  calibration at once on a background worker, while the image lines are still arriving. Every
  image of that slice position (cine phases, repetitions, contrasts, sets, averages) that brings
  no reference lines of its own calibrates on it (`share_reference`): the protocol measured one
  reference for all of them, so they reuse one calibration.
- Reference lines that come with each image (embedded ACS): every cine phase carries its own,
  and they differ (motion, noise), so each image is calibrated on its own lines, inline in the
  recon stage as before. A calibration is reused only where the reference block is the same
  bytes (fingerprint), so reuse never changes an image: images are bit-identical to calibrating
  inline (tests/test_reference_prep.py).

The calibrations of a stream are cached by (slice position, fingerprint of the reference block,
recipe) in least-recently-used order, bounded by `cache_mib` (one 256 x 256 calibration with 8
virtual coils holds 4 MiB; an evicted one is computed again when needed). Recon stages declare
the recipe they calibrate with when the chain is built (`declare_recipe`) and take the prepared
calibration from the slice (`KSpaceSlice.reference`); a slice without one, a 3D slice and a
slice with fewer than MIN_CALIBRATION_REFERENCE_LINES calibrate in the recon stage as before.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .context import StreamContext
from .items import KSpaceSlice, ReferenceData
from .numerics.calibration import compressed_calibration, sense_calibration_options
from .numerics.reference import MIN_CALIBRATION_REFERENCE_LINES, centre_region, reference_run
from .slices import calibration_mode

log = logging.getLogger("pisf.reference")
DEFAULT_CACHE_MIB = 64.0
DEFAULT_WORKERS = 1          # background calibrations at once, per server (2-core consoles: one)
MAX_POSITIONS = 1024         # separate references kept per stream (one per slice position; 0.4 MiB at 24 x 256 x 8)


@dataclass(frozen=True)
class CalibrationRecipe:
    """What a recon stage computes from a reference block [C, L, nx]: `compressed_maps` of the
    block (or of its central `region` = (lines, columns)) to at most `virtual_coils` coils on
    the image grid. The PISF stage's is PisfReconstructor.calibrate's, the sense stage's
    reconstruct_classical's; equal recipes on equal blocks give equal bytes."""
    virtual_coils: int
    region: tuple[int, int] | None = None
    maps: int | str = 1              # "auto": two ESPIRiT maps where the object folds (PISF: the guard's sign)
    sense_options: bool = False      # the sense chain's options (`sense_calibration_options`)

    def compute(self, block: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(compression matrix, maps, eigenvalue maps): uncropped, since the crop depends on the R
        of each image that takes the calibration (classical.py crops per image)."""
        lines = block.shape[1]
        if self.region is not None:
            block = centre_region(block, *self.region)
        options = sense_calibration_options(lines) if self.sense_options else {"maps": self.maps}
        return compressed_calibration(block, shape, self.virtual_coils, **options)


class CalibrationTask:
    """One calibration, computed once: by a background worker if one gets to it first, else by
    the first stage that needs it (a stage never waits for a worker that has not started)."""

    def __init__(self, compute: Callable[[], tuple[np.ndarray, np.ndarray]], nbytes: int):
        self._compute = compute
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.nbytes = nbytes                 # of the result (cache bound)
        self.state = "pending"               # pending -> running -> done
        self.where: str | None = None        # background | inline
        self.started: float | None = None    # time.monotonic()
        self.seconds: float | None = None
        self.uses = 0                        # images that took it so far
        self._result = None
        self._error: BaseException | None = None

    def run(self, where: str) -> bool:
        """Compute now unless someone has already started; True if this call computed it."""
        with self._lock:
            if self.state != "pending":
                return False
            self.state, self.where, self.started = "running", where, time.monotonic()
        started = time.perf_counter()
        try:
            self._result = self._compute()
        except Exception as exc:      # e.g. ValueError from the calibration: every user hears it
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started
            self._compute = None      # drops the reference block it closed over
            self.state = "done"
            self._done.set()
        return True

    def take(self) -> "CalibrationUse":
        """The result for one image (computed here if no worker has started it)."""
        asked = time.perf_counter()
        self.run("inline")
        self._done.wait()
        held = time.perf_counter() - asked          # computing it here, or waiting for the worker
        if self._error is not None:
            raise type(self._error)(*self._error.args)
        with self._lock:
            reused = self.uses > 0
            self.uses += 1
        matrix, maps, *eigenvalues = self._result
        return CalibrationUse(matrix, maps, self.seconds, held, self.where, reused, self.started,
                              eigenvalues[0] if eigenvalues else None)


@dataclass
class CalibrationUse:
    """A calibration as one image got it, and what its meta says about it."""
    matrix: np.ndarray          # compression [V, coils]
    maps: np.ndarray            # ESPIRiT maps of the virtual coils [V, ny, nx]
    seconds: float              # computing it (once, wherever it ran)
    held: float                 # what it cost this image: computing it here, or waiting for the worker
    where: str                  # background | inline
    reused: bool                # computed for an earlier image of this slice position
    started: float              # time.monotonic() when its computation began
    eigenvalues: np.ndarray | None = None   # ESPIRiT eigenvalue maps [ny, nx] ([2, ny, nx] with two maps)

    @property
    def maps_pair(self) -> tuple[np.ndarray, np.ndarray]:
        return self.matrix, self.maps

    @property
    def sense_calibration(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(matrix, maps, eigenvalues) as reconstruct_classical takes them (it crops per image)."""
        return self.matrix, self.maps, self.eigenvalues

    def meta(self, first_line_time: float | None = None) -> dict[str, str]:
        meta = {"PISF_CalibrationMs": f"{self.seconds * 1e3:.1f}",
                "PISF_CalibrationReused": "true" if self.reused else "false",
                "PISF_CalibrationWhere": self.where,
                "PISF_CalibrationWaitMs": f"{self.held * 1e3:.1f}"}
        if first_line_time is not None:   # > 0: the calibration began before the slice's first image line
            meta["PISF_CalibrationLeadMs"] = f"{(first_line_time - self.started) * 1e3:.1f}"
        return meta


class _Workers:
    """Background calibration threads of the process (daemons, started with the first task).
    A task whose stream has been cancelled is skipped; a stage that needs it computes it itself."""

    def __init__(self, threads: int = DEFAULT_WORKERS):
        self.threads = threads
        self.tasks: queue.Queue = queue.Queue()
        self.started: list[threading.Thread] = []
        self.lock = threading.Lock()

    def submit(self, task: CalibrationTask, cancelled: Callable[[], bool]) -> None:
        with self.lock:
            while len(self.started) < self.threads:
                thread = threading.Thread(target=self._work, name=f"pisf-calibration-{len(self.started) + 1}",
                                          daemon=True)
                thread.start()
                self.started.append(thread)
        self.tasks.put((task, cancelled))

    def _work(self) -> None:
        while True:
            task, cancelled = self.tasks.get()
            try:
                if not cancelled():
                    task.run("background")
            except Exception:        # never reached (run keeps errors in the task); the worker must live
                log.exception("background calibration failed")


WORKERS = _Workers()


class CalibrationCache:
    """One stream's calibrations by (slice position, fingerprint, recipe), least recently used
    first out once they hold more than `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.tasks: OrderedDict[tuple, CalibrationTask] = OrderedDict()
        self.nbytes = 0
        self.created = 0                    # calibrations set up (each computed once unless evicted)
        self.lock = threading.Lock()

    def task(self, key: tuple, compute: Callable, nbytes: int) -> tuple[CalibrationTask, bool]:
        """(the task of this key, True if it was created now)."""
        with self.lock:
            task = self.tasks.get(key)
            if task is not None:
                self.tasks.move_to_end(key)
                return task, False
            task = self.tasks[key] = CalibrationTask(compute, nbytes)
            self.created += 1
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes and len(self.tasks) > 1:
                _, evicted = self.tasks.popitem(last=False)
                self.nbytes -= evicted.nbytes
            return task, True


class PreparedReference:
    """The reference block of one slice, as the recon stages calibrate on it: `calibration(recipe)`
    gives the calibration from the stream's cache (computed in the background, by an earlier
    image, or now)."""

    def __init__(self, position: int, block: np.ndarray, shape: tuple[int, int], cache: CalibrationCache | None,
                 shared: bool):
        self.position = position
        self.block = block                    # [C, L, nx]: the run of reference lines through the centre
        self.shape = shape                    # (ny, nx) of the image grid
        self.fingerprint = reference_fingerprint(block, shape)
        self.cache = cache                    # None: every image calibrates for itself (reuse off)
        self.shared = shared                  # the slice position's separate reference, not the image's own lines

    def task(self, recipe: CalibrationRecipe) -> tuple[CalibrationTask, bool]:
        block, shape = self.block, self.shape
        nbytes = (8 * min(block.shape[0], recipe.virtual_coils) * (shape[0] * shape[1] + block.shape[0])
                  + 4 * shape[0] * shape[1])             # + the eigenvalue map
        compute = lambda: recipe.compute(block, shape)       # noqa: E731 (closes over this block only)
        if self.cache is None:
            return CalibrationTask(compute, nbytes), True
        return self.cache.task((self.position, self.fingerprint, recipe), compute, nbytes)

    def calibration(self, recipe: CalibrationRecipe) -> CalibrationUse:
        task, _ = self.task(recipe)
        return task.take()


def reference_fingerprint(block: np.ndarray, shape: tuple[int, int]) -> str:
    """Digest of the reference block's bytes, shape and type and of the image grid: equal
    fingerprints, equal calibrations."""
    block = np.ascontiguousarray(block)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((block.shape, block.dtype.str, tuple(shape))).encode())
    digest.update(block.data)
    return digest.hexdigest()


def reference_block_of(calibration: np.ndarray, calibration_sampled: np.ndarray) -> tuple[np.ndarray, int]:
    """(block [C, L, nx], L) of plane 0 as the recon stages cut it (numerics/reference.py:
    reference_block on the slice's reference lines), so the bytes agree with theirs."""
    run = reference_run(calibration_sampled[0])
    return np.asarray(calibration[:, 0])[:, run], int(run.sum())


def declare_recipe(context: StreamContext, recipe: CalibrationRecipe) -> None:
    """A recon stage's calibration, declared when the chain is built, so a separate reference's
    calibration can start before the first image needs it (nothing where the chain has no
    reference_prep stage)."""
    preparation = getattr(context, "reference_preparation", None)
    if preparation is not None:
        preparation.recipes.add(recipe)


def prepared_calibration(item: KSpaceSlice, recipe: CalibrationRecipe | None) -> CalibrationUse | None:
    """The slice's calibration from reference_prep (None where the stage did not prepare the
    slice: the recon stage calibrates as before). ValueError as the calibration raises it."""
    if recipe is None or getattr(item, "reference", None) is None:
        return None
    return item.reference.calibration(recipe)


class ReferencePrep:
    """ReferenceData and KSpaceSlice -> KSpaceSlice with `reference` (a PreparedReference).

    reuse: false computes every image's calibration for itself (a separate reference is still
    shared; for comparisons). share_reference: auto (when the header's calibration mode is
    separate), true or false: images without reference lines of their own take their slice
    position's latest separate reference. background: start a separate reference's calibration
    on a worker as soon as it is complete (false: the first image computes it). cache_mib: the
    bound on the stream's cached calibrations."""

    def __init__(self, context: StreamContext, reuse: bool = True, share_reference: str | bool = "auto",
                 background: bool = True, cache_mib: float = DEFAULT_CACHE_MIB):
        if share_reference not in ("auto", True, False):
            raise ValueError(f"share_reference must be auto, true or false, not {share_reference!r}")
        self.context = context
        self.separate = calibration_mode(context.header) == "separate"
        self.share = self.separate if share_reference == "auto" else bool(share_reference)
        self.background = bool(background)
        self.cache = CalibrationCache(int(float(cache_mib) * 2 ** 20)) if reuse else None
        self.recipes: set[CalibrationRecipe] = set()
        self.references: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()   # position -> lines
        self.announced = False
        context.reference_preparation = self     # the accumulator emits ReferenceData, recon stages declare

    def __call__(self, items):
        for item in items:
            if isinstance(item, ReferenceData):
                self._reference(item)        # consumed: a reference makes no item of its own
            elif isinstance(item, KSpaceSlice):
                yield self._prepare(item)
            else:
                yield item

    def _reference(self, reference: ReferenceData):
        """A separate reference is complete: keep it for its slice position, start its calibrations."""
        position = reference.key.slice
        if self.share:
            self.references[position] = (reference.calibration, reference.calibration_sampled)
            self.references.move_to_end(position)
            while len(self.references) > MAX_POSITIONS:
                self.references.popitem(last=False)
        calibration, sampled = reference.grid()
        block, lines = reference_block_of(calibration, sampled)
        self.context.log.info("slice position %d: separate reference complete (%d lines through the centre)%s",
                              position, lines, ", calibration started" if self.background and self.recipes else "")
        if lines < MIN_CALIBRATION_REFERENCE_LINES or calibration.shape[1] != 1 or not self.background:
            return
        prepared = PreparedReference(position, block, tuple(calibration.shape[2:]), self.cache, shared=True)
        for recipe in self.recipes:
            task, created = prepared.task(recipe)
            if created and self.cache is not None:   # without the cache nobody would take it
                WORKERS.submit(task, self.context.is_cancelled)

    def _prepare(self, item: KSpaceSlice):
        if item.kspace.shape[1] != 1:
            return item                  # 3D: the recon stages calibrate per partition
        shared = False
        own = item.calibration is not None and bool(item.calibration_sampled[0].any())
        if not own and self.share and item.key.slice in self.references:
            lines, sampled = self.references[item.key.slice]
            calibration = np.zeros_like(item.kspace)
            calibration[:, sampled] = lines
            item = replace(item, calibration=calibration, calibration_sampled=sampled.copy(), reference_shared=True)
            shared = True
        elif own and self.share and item.key.slice not in self.references:
            # a separate reference that came inside an image (e.g. Gadgetron's buffers): later images share it
            self.references[item.key.slice] = (item.calibration[:, item.calibration_sampled],
                                               item.calibration_sampled.copy())
        if item.calibration is None:
            return item
        block, lines = reference_block_of(item.calibration, item.calibration_sampled)
        if lines < MIN_CALIBRATION_REFERENCE_LINES:
            return item
        shape = tuple(item.kspace.shape[2:])
        return replace(item, reference=PreparedReference(item.key.slice, block, shape, self.cache, shared))


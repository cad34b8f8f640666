"""Expert-tuned BART anchors for the evaluation: SENSE (`pics -l2`) and l1-ESPIRiT (`pics -l1`,
wavelets), both with ESPIRiT maps, tuned PER CASE BY PSNR AGAINST THE FULLY SAMPLED REFERENCE
(an oracle choice that favours BART: a scanner has no reference to tune on).

This is also the one place the tools call BART (`run_bart`: the anchors here, `pisf evaluate`'s
2D Poisson row, `pisf bench`, `pisf bench-model`, `pisf classical-table`). Array layouts, both
written here and nowhere else, from our K[C, ny, nx] (coil, phase encode, readout):

    to_bart              (nx, ny, 1, C)  BART's own order: dim 0 READ, dim 1 PHS1, dim 3 COIL.
                                         The timings (bench, bench-model) use it, so BART is
                                         timed at its best: on the simulated 256x256x8 demo
                                         slices `pics -l1` took 25-35 % longer on the
                                         transposed array, on bench-model's phantom slice 4 %
                                         (one thread, shared machine).
    to_bart_phase_first  (ny, nx, 1, C)  the evaluation anchors' order (phase encode in dim 0,
                                         images back as (ny, nx[, maps])): every cached anchor
                                         and every BART number of `pisf evaluate` was computed
                                         on it; moving them to BART's order would re-run the
                                         whole cache and move the l1 anchors by pics's random
                                         wavelet shifts, so they keep it.

What a run gets is what a scanner sends: `ecalib` sees only the calibration k-space (the
reference lines; embedded ACS or separate reference), `pics` only the image lines. With PE as
dim 0, `ecalib -r NCAL:NX` bounds the calibration region by the calibration lines along PE and
the whole readout.

Search (coordinate descent, coarse to fine; every trial's settings and PSNR are recorded):
1. lambda on a coarse grid (LAMBDAS_COARSE) with ESPIRiT `-m1 -c 0.9`, then a line search in
   half-decade steps (walk while the PSNR improves);
2. every calibration (maps 1 or 2 x crop 0.8 / 0.9 / 0.95 / none) at that lambda;
3. a line search in quarter-decade steps at the best calibration (inside LAMBDA_RANGE);
4. l1 only: the chosen settings also at FINAL_L1_ITERATIONS; the better of the two is kept.
About 15 pics runs per regulariser and case.
Two maps are combined by root-sum-of-squares of pics's per-map images.

Iterations: `pics -l2` runs conjugate gradients, converged at 100 (100 and 300 iterations gave
identical PSNR on the phantom and the brain); `pics -l1` (FISTA with random wavelet shifts)
gains <= 0.15 dB from 100 to 300 iterations, hence step 5.

Every pics result is cached on disk (CACHE_DIR/<sha256>.npz, keyed by the input k-space,
calibration k-space, every setting and the BART version), with its measured ecalib and pics
times, so a re-evaluation only re-reads the images. BART runs single-threaded
(OMP_NUM_THREADS=1; two threads on two cores were ~4x slower).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gadgets.numerics.coils import root_sum_of_squares
from tools.rawdata.cfl import read_cfl, write_cfl

CACHE_DIR = Path("runs/bart_cache")
REGULARISERS = ("l2", "l1")
# lambdas live on the quarter-decade grid 10^(k/4) (0.0316 is the "3e-2" of the l1 grid)
LAMBDAS_COARSE = {"l2": (1e-4, 1e-3, 1e-2, 1e-1), "l1": (1e-4, 1e-3, 1e-2, 3.16e-2)}
LAMBDA_RANGE = {"l2": (3.16e-5, 0.316), "l1": (3.16e-5, 0.1)}   # the line searches stay inside
MAPS = (1, 2)
CROPS = (0.8, 0.9, 0.95, None)                              # None: no crop (-c 0)
DEFAULT_CALIBRATION = (1, 0.9)
ITERATIONS = 100
FINAL_L1_ITERATIONS = 300
KERNEL = 6                                                  # ecalib default 6x6 kernel
ANCHOR_NAMES = {"l2": "bart_sense_l2", "l1": "bart_l1_espirit"}
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- calling BART
def bart_available() -> bool:
    return shutil.which("bart") is not None


def bart_version() -> str:
    if not bart_available():
        return "missing"
    out = subprocess.run(["bart", "version"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def single_thread_env() -> dict:
    """The environment BART runs in here: OMP_NUM_THREADS=1 (two threads on two cores were ~4x
    slower; one thread also matches the server's one BLAS thread per chain)."""
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_bart(args, env: dict | None = None, cwd: str | Path | None = None) -> float:
    """`bart ARGS...`; wall seconds. A failure raises RuntimeError with BART's own message."""
    start = time.perf_counter()
    proc = subprocess.run(["bart", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bart {' '.join(map(str, args))} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return time.perf_counter() - start


def to_bart(kspace: np.ndarray) -> np.ndarray:
    """K[C, ny, nx] -> BART's own order (nx, ny, 1, C) complex64: READ, PHS1, -, COIL."""
    return np.transpose(np.asarray(kspace, dtype=np.complex64), (2, 1, 0))[:, :, None, :]


def to_bart_phase_first(kspace: np.ndarray) -> np.ndarray:
    """K[C, ny, nx] -> (ny, nx, 1, C) complex64, phase encode in dim 0: the anchors' order
    (module docstring)."""
    return np.transpose(np.asarray(kspace, dtype=np.complex64), (1, 2, 0))[:, :, None, :]


def write_bart(stem: str | Path, kspace: np.ndarray, phase_first: bool = False) -> None:
    """K[C, ny, nx] as BART files stem.cfl/stem.hdr, in BART's order (`to_bart`) or, for the
    anchors, phase encode first (`to_bart_phase_first`)."""
    write_cfl(stem, to_bart_phase_first(kspace) if phase_first else to_bart(kspace))


# ----------------------------------------------------------------------------- tuned anchors


def _psnr(reference: np.ndarray, image: np.ndarray) -> float:
    from tools.evaluation.metrics import psnr, scale_match
    return psnr(reference, scale_match(image, reference))


def _canonical(lam: float) -> float:
    """lambda snapped to the quarter-decade grid 10^(k/4), 3 significant digits (one key for one
    value however the search reached it)."""
    return float(f"{10 ** (round(4 * math.log10(lam)) / 4):.3g}")


@dataclass
class AnchorResult:
    """A tuned anchor on one case."""
    name: str                     # bart_sense_l2 | bart_l1_espirit
    image: np.ndarray             # float32 magnitude [ny, nx]
    settings: dict                # maps, crop, lambda, iterations, calib_region, kernel
    psnr: float                   # at the chosen settings (scale-matched, vs the reference)
    seconds: float                # ecalib + pics at the chosen settings (measured)
    tuning_seconds: float         # every trial's ecalib + pics (measured, cached ones included)
    trials: list = field(default_factory=list)
    oracle: str = "per-case oracle tuning by PSNR against the fully sampled reference"

    def summary(self) -> dict:
        return {"name": self.name, "settings": self.settings, "psnr": self.psnr,
                "seconds": self.seconds, "tuning_seconds": self.tuning_seconds,
                "trials": self.trials, "oracle": self.oracle}

    def settings_text(self) -> str:
        s = self.settings
        crop = "none" if s["crop"] is None else f"{s['crop']:g}"
        return f"m{s['maps']} c{crop} r{s['lambda']:.3g} i{s['iterations']}"


class BartCase:
    """One case's inputs for BART, with on-disk caching of every pics result.

    image_kspace, calibration_kspace: [C, ny, nx] (image lines; reference lines, zeros elsewhere).
    """

    def __init__(self, image_kspace: np.ndarray, calibration_kspace: np.ndarray,
                 cache_dir: str | Path | None = CACHE_DIR):
        self.image_kspace = np.ascontiguousarray(image_kspace, dtype=np.complex64)
        self.calibration_kspace = np.ascontiguousarray(calibration_kspace, dtype=np.complex64)
        lines = np.any(self.calibration_kspace != 0, axis=(0, 2))
        if not lines.any():
            raise ValueError("calibration k-space is empty")
        self.calibration_lines = int(lines.sum())
        self.nx = self.image_kspace.shape[2]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        digest = hashlib.sha256()
        for array in (self.image_kspace, self.calibration_kspace):
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
        self.input_hash = digest.hexdigest()
        self.env = single_thread_env()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._maps: dict[tuple, float] = {}       # calibration -> ecalib seconds (files in tmp)
        self.version = None

    # ------------------------------------------------------------------ files
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._maps.clear()

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pisf_bart_")
            write_bart(Path(self._tmp.name) / "ksp", self.image_kspace, phase_first=True)
            write_bart(Path(self._tmp.name) / "cal", self.calibration_kspace, phase_first=True)
        return Path(self._tmp.name)

    def calib_region(self) -> str:
        return f"{self.calibration_lines}:{self.nx}"

    def _sens(self, maps: int, crop: float | None) -> tuple[Path, float]:
        stem = self.tmp / f"sens_m{maps}_c{crop if crop is not None else 0}"
        if (maps, crop) not in self._maps:
            seconds = run_bart(["ecalib", "-m", maps, "-k", KERNEL, "-r", self.calib_region(),
                                "-c", 0 if crop is None else crop, self.tmp / "cal", stem], self.env)
            self._maps[(maps, crop)] = seconds
        return stem, self._maps[(maps, crop)]

    # ------------------------------------------------------------------ one recon
    def settings(self, regulariser: str, maps: int, crop: float | None, lam: float, iterations: int) -> dict:
        return {"regulariser": regulariser, "maps": int(maps), "crop": crop, "lambda": float(lam),
                "iterations": int(iterations), "calib_region": self.calib_region(), "kernel": KERNEL}

    def _cache_path(self, settings: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        if self.version is None:
            self.version = bart_version()
        key = json.dumps({"input": self.input_hash, "settings": settings, "bart": self.version,
                          "cache_version": CACHE_VERSION}, sort_keys=True)
        return self.cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")

    def reconstruct(self, regulariser: str, maps: int, crop: float | None, lam: float,
                    iterations: int = ITERATIONS) -> tuple[np.ndarray, float, float, bool]:
        """(magnitude image [ny, nx], ecalib seconds, pics seconds, cached?) for one setting."""
        lam = _canonical(lam)
        settings = self.settings(regulariser, maps, crop, lam, iterations)
        path = self._cache_path(settings)
        if path is not None and path.is_file():
            with np.load(path) as cached:
                return (cached["image"], float(cached["ecalib_seconds"]),
                        float(cached["pics_seconds"]), True)
        sens, ecalib_seconds = self._sens(maps, crop)
        out = self.tmp / "rec"
        pics_seconds = run_bart(["pics", "-S", f"-{regulariser}", "-r", lam, "-i", iterations,
                                 self.tmp / "ksp", sens, out], self.env)
        rec = read_cfl(out)
        ny = self.image_kspace.shape[1]
        per_map = rec.reshape(ny, self.nx, -1)
        image = root_sum_of_squares(per_map, axis=-1).astype(np.float32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp_path = path.with_suffix(".tmp.npz")
            np.savez(tmp_path, image=image, ecalib_seconds=ecalib_seconds, pics_seconds=pics_seconds,
                     settings=json.dumps(settings))
            os.replace(tmp_path, path)
        return image, ecalib_seconds, pics_seconds, False


def tune(case: BartCase, reference: np.ndarray, regulariser: str, log=None) -> AnchorResult:
    """Oracle-tune one regulariser ("l2" or "l1") on one case (see the module docstring)."""
    if regulariser not in REGULARISERS:
        raise ValueError(regulariser)
    trials: dict[tuple, dict] = {}
    images: dict[tuple, np.ndarray] = {}

    def trial(maps, crop, lam, iterations=ITERATIONS) -> float:
        lam = _canonical(lam)
        key = (maps, crop, lam, iterations)
        if key not in trials:
            image, ecal_s, pics_s, cached = case.reconstruct(regulariser, maps, crop, lam, iterations)
            score = _psnr(reference, image)
            trials[key] = {"maps": maps, "crop": crop, "lambda": float(lam), "iterations": iterations,
                           "psnr": score, "ecalib_seconds": ecal_s, "pics_seconds": pics_s,
                           "cached": cached}
            images[key] = image
        return trials[key]["psnr"]

    def best_lambda(maps, crop, lambdas):
        return max(lambdas, key=lambda lam: trial(maps, crop, lam))

    def line_search(maps, crop, lam, step):
        """Walk lambda by factors of `step` while the PSNR improves (inside LAMBDA_RANGE)."""
        lo, hi = LAMBDA_RANGE[regulariser]
        for direction in (step, 1 / step):
            moved = False
            while (lo <= _canonical(lam * direction) <= hi
                   and trial(maps, crop, lam * direction) > trial(maps, crop, lam)):
                lam, moved = _canonical(lam * direction), True
            if moved:
                break
        return lam

    def best_calibration(lam):
        return max(((m, c) for m in MAPS for c in CROPS), key=lambda mc: trial(mc[0], mc[1], lam))

    maps, crop = DEFAULT_CALIBRATION
    lam = best_lambda(maps, crop, LAMBDAS_COARSE[regulariser])
    lam = line_search(maps, crop, lam, 10 ** 0.5)
    maps, crop = best_calibration(lam)
    lam = line_search(maps, crop, lam, 10 ** 0.25)
    iterations = ITERATIONS
    if regulariser == "l1":
        if trial(maps, crop, lam, FINAL_L1_ITERATIONS) > trial(maps, crop, lam, ITERATIONS):
            iterations = FINAL_L1_ITERATIONS
    lam = _canonical(lam)
    key = (maps, crop, lam, iterations)
    chosen = trials[key]
    result = AnchorResult(
        name=ANCHOR_NAMES[regulariser], image=images[key],
        settings=case.settings(regulariser, maps, crop, lam, iterations), psnr=chosen["psnr"],
        seconds=chosen["ecalib_seconds"] + chosen["pics_seconds"],
        tuning_seconds=sum(t["pics_seconds"] for t in trials.values())
        + sum({(t["maps"], t["crop"]): t["ecalib_seconds"] for t in trials.values()}.values()),
        trials=list(trials.values()))
    if log is not None:
        log(f"    {result.name}: {result.psnr:.2f} dB at {result.settings_text()} "
            f"({len(trials)} trials, {sum(t['cached'] for t in trials.values())} cached, "
            f"{result.seconds:.2f} s for the chosen settings)")
    return result


def bart_anchors(image_kspace: np.ndarray, calibration_kspace: np.ndarray, reference: np.ndarray,
                 cache_dir: str | Path | None = CACHE_DIR, regularisers=REGULARISERS,
                 log=None) -> dict[str, AnchorResult]:
    """Both anchors, tuned per case against `reference`: {"bart_sense_l2": ..., "bart_l1_espirit": ...}."""
    with BartCase(image_kspace, calibration_kspace, cache_dir) as case:
        return {ANCHOR_NAMES[r]: tune(case, reference, r, log=log) for r in regularisers}

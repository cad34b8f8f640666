"""Latency of the PISF inference core on one 256x256x8 slice (numpy + onnxruntime CPU).

    pisf bench-model models/pisf_sense.onnx models/pisf_fast.onnx [--threads 2 1] [--repeats 10]

Times `PisfReconstructor.reconstruct` end to end (compression, calibration for contract 2,
normalisation, FFTs, the ONNX run over all 256 rows, coil combination), the ONNX run alone and,
for contract 2, the ESPIRiT calibration alone; prints JSON (median and min seconds). The slice is
a Shepp-Logan phantom seen by smooth synthetic coils (random data would keep every ESPIRiT
kernel, an unrealistic worst case), equispaced R=4 plus 24 embedded reference lines.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def phantom_slice(size: int = 256, coils: int = 8) -> np.ndarray:
    """K[coils, size, size]: Shepp-Logan with smooth phase, Gaussian coil profiles around it."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    from gadgets.numerics.fft import fftc
    image = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    image = image * np.exp(1j * (0.5 * x + 0.3 * y))
    angles = 2 * np.pi * np.arange(coils) / coils
    sens = np.stack([np.exp(-((x - 1.2 * np.cos(a)) ** 2 + (y - 1.2 * np.sin(a)) ** 2) / 1.5) * np.exp(1j * a)
                     for a in angles])
    rng = np.random.default_rng(0)
    noise = 0.002 * (rng.standard_normal((coils, size, size)) + 1j * rng.standard_normal((coils, size, size)))
    return (fftc(sens * image[None], axes=(1, 2)) + noise).astype(np.complex64)


def bench(model_path: str, threads: int = 2, repeats: int = 10, size: int = 256, coils: int = 8,
          acceleration: int = 4) -> dict:
    from gadgets.numerics.calibration import espirit_maps
    from gadgets.numerics.pisf_inference import PisfReconstructor

    kspace = phantom_slice(size, coils)
    mask = np.zeros(size, dtype=np.float32)
    mask[::acceleration] = 1
    lines = np.zeros(size, dtype=bool)
    lines[size // 2 - 12: size // 2 + 12] = True
    mask[lines] = 1
    measured = kspace * mask[None, :, None]
    recon = PisfReconstructor(model_path, threads=threads)
    row_masks = np.ascontiguousarray(np.broadcast_to(mask[None, None], (size, 1, size)))
    if recon.contract == "2":
        channels = 2 * min(coils, recon.virtual_coils)
        example = np.zeros((size, channels, size), np.float32)
        inputs = (example, row_masks, example + np.float32(1.0 / np.sqrt(channels // 2)))
    else:
        inputs = (recon.preprocess(measured, mask)[0], row_masks)
    recon.reconstruct(measured, mask)                                  # warm-up
    total, onnx_only, calibration = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        recon.reconstruct(measured, mask)
        total.append(time.perf_counter() - start)
        start = time.perf_counter()
        recon.run_rows(*inputs)
        onnx_only.append(time.perf_counter() - start)
        if recon.contract == "2":
            start = time.perf_counter()
            espirit_maps(kspace[:min(coils, recon.virtual_coils), lines], (size, size))
            calibration.append(time.perf_counter() - start)
    result = {"model": model_path, "variant": recon.variant, "contract": recon.contract,
              "threads": threads, "slice": f"{size}x{size}x{coils}",
              "reconstruct_median_s": float(np.median(total)), "reconstruct_min_s": float(np.min(total)),
              "onnx_median_s": float(np.median(onnx_only)), "onnx_min_s": float(np.min(onnx_only)),
              "repeats": repeats}
    if calibration:
        result["calibration_median_s"] = float(np.median(calibration))
    return result


def bench_bart(repeats: int = 3, size: int = 256, coils: int = 8, acceleration: int = 4) -> dict:
    """BART on the same slice, one thread (REFERENCE.md): ecalib -m1 -r 24 -k 4 -c 0.9, then
    pics -S -l1 -r 0.01 and pics -S -l2 -r 0.01; median seconds per step and per pipeline."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from tools.rawdata.cfl import write_cfl
    kspace = phantom_slice(size, coils)
    mask = np.zeros(size, dtype=np.float32)
    mask[::acceleration] = 1
    mask[size // 2 - 12: size // 2 + 12] = 1
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times = {"ecalib": [], "pics_l1": [], "pics_l2": []}
    with tempfile.TemporaryDirectory(prefix="pisf_bench_bart_") as tmp:
        stem = Path(tmp)
        write_cfl(stem / "ksp", np.transpose(kspace * mask[None, :, None], (1, 2, 0))[:, :, None, :])
        commands = {"ecalib": ["ecalib", "-m1", "-r", "24", "-k", "4", "-c", "0.9", "ksp", "sens"],
                    "pics_l1": ["pics", "-S", "-l1", "-r", "0.01", "ksp", "sens", "rec1"],
                    "pics_l2": ["pics", "-S", "-l2", "-r", "0.01", "ksp", "sens", "rec2"]}
        for _ in range(repeats):
            for step, args in commands.items():
                start = time.perf_counter()
                subprocess.run(["bart"] + args, cwd=tmp, env=env, check=True, capture_output=True)
                times[step].append(time.perf_counter() - start)
    median = {step: float(np.median(values)) for step, values in times.items()}
    return {"bart": True, "slice": f"{size}x{size}x{coils}", "threads": 1, **{f"{k}_median_s": v for k, v in median.items()},
            "ecalib_pics_l1_s": median["ecalib"] + median["pics_l1"],
            "ecalib_pics_l2_s": median["ecalib"] + median["pics_l2"], "repeats": repeats}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="ONNX models")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="onnxruntime thread counts")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per model and thread count")
    parser.add_argument("--bart", action="store_true", help="also time BART ecalib + pics on the same slice")


def run(args: argparse.Namespace) -> int:
    from gadgets import limit_blas_threads
    limit_blas_threads()          # as in the server (OpenBLAS threads thrash on small matrices)
    for model in args.models:
        for threads in args.threads:
            print(json.dumps(bench(model, threads, args.repeats)), flush=True)
    if args.bart:
        import shutil
        if shutil.which("bart") is None:
            print("bart not found: BART timing skipped")
        else:
            print(json.dumps(bench_bart(max(1, min(args.repeats, 3)))), flush=True)
    return 0

"""Latency of the PISF inference core on one 256x256x8 slice (numpy + onnxruntime CPU).

    pisf bench-model models/pisf_fast.onnx [--threads 2 1] [--repeats 10]

Times `PisfReconstructor.reconstruct` end to end (compression, normalisation, FFTs, the ONNX
run over all 256 rows, RSS) and the ONNX run alone; prints JSON (median and min seconds).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def bench(model_path: str, threads: int = 2, repeats: int = 10, size: int = 256, coils: int = 8,
          acceleration: int = 4) -> dict:
    from gadgets.numerics.pisf_inference import PisfReconstructor

    rng = np.random.default_rng(0)
    kspace = (rng.standard_normal((coils, size, size)) + 1j * rng.standard_normal((coils, size, size)))
    kspace = kspace.astype(np.complex64)
    mask = np.zeros(size, dtype=np.float32)
    mask[::acceleration] = 1
    mask[size // 2 - 10: size // 2 + 10] = 1
    recon = PisfReconstructor(model_path, threads=threads)
    rows, _, _ = recon.preprocess(kspace, mask)
    row_masks = np.broadcast_to(mask[None, None], (rows.shape[0], 1, size)).copy()
    recon.reconstruct(kspace, mask)                                  # warm-up
    total, onnx_only = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        recon.reconstruct(kspace, mask)
        total.append(time.perf_counter() - start)
        start = time.perf_counter()
        recon.run_rows(rows, row_masks)
        onnx_only.append(time.perf_counter() - start)
    return {"model": model_path, "variant": recon.variant, "threads": threads,
            "slice": f"{size}x{size}x{coils}", "reconstruct_median_s": float(np.median(total)),
            "reconstruct_min_s": float(np.min(total)), "onnx_median_s": float(np.median(onnx_only)),
            "onnx_min_s": float(np.min(onnx_only)), "repeats": repeats}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="ONNX models")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="onnxruntime thread counts")
    parser.add_argument("--repeats", type=int, default=10)


def run(args: argparse.Namespace) -> int:
    for model in args.models:
        for threads in args.threads:
            print(json.dumps(bench(model, threads, args.repeats)), flush=True)
    return 0

"""Latency of the PISF inference core on one size x size x coils slice (numpy + onnxruntime CPU).

    pisf bench-model models/pisf_v3.onnx models/pisf_sense.onnx [--threads 2 1] [--repeats 10]
        [--sizes 128 256 384]
    pisf bench-model models/pisf_v3.onnx models/pisf_v3.onnx:block_cg=8 --threads 1   (run-time options
        as in `pisf evaluate --model`, tools/evaluation/harness.model_spec)

Times `PisfReconstructor.reconstruct` end to end (compression, calibration for contracts 2 and 3,
normalisation, FFTs, the network over all rows, coil combination), the network alone (contracts
1, 2: the ONNX run; contract 3: the regulariser bank plus the numpy data consistency) and, for
contracts 2 and 3, the ESPIRiT calibration alone; prints JSON (median and min seconds). Models
and thread counts are interleaved repetition by repetition. The slice is
a Shepp-Logan phantom seen by smooth synthetic coils (random data would keep every ESPIRiT
kernel, an unrealistic worst case), equispaced R=4 plus 24 embedded reference lines.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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


def bench_slice(size: int, coils: int = 8, acceleration: int = 4):
    """(k-space on the sampled lines, mask [ny], reference lines [ny]) of the benchmark slice."""
    kspace = phantom_slice(size, coils)
    mask = np.zeros(size, dtype=np.float32)
    mask[::acceleration] = 1
    lines = np.zeros(size, dtype=bool)
    lines[size // 2 - 12: size // 2 + 12] = True
    mask[lines] = 1
    return kspace * mask[None, :, None], mask, lines


def network_part(recon, measured: np.ndarray, mask: np.ndarray):
    """A call that times the network alone on this slice (calibration done beforehand): the ONNX
    run over all rows (contracts 1, 2: the graph holds the data consistency), or the numpy data
    consistency around the regulariser bank (contract 3)."""
    from gadgets.numerics.coils import compress, normalisation_scale
    from gadgets.numerics.fft import ifftc
    from gadgets.numerics.pisf_inference import to_rows

    size = mask.size
    row_masks = np.ascontiguousarray(np.broadcast_to(mask[None, None], (measured.shape[2], 1, size)))
    if not recon.scan_calibrated:
        rows = recon.preprocess(measured, mask)[0]
        return lambda: recon.run_rows(rows, row_masks)
    matrix, maps = recon.calibrate(measured, mask)
    data = compress(measured, matrix)
    hybrid = ifftc(data, axes=(-1,)) / normalisation_scale(data, mask)
    if recon.contract == "3":
        return lambda: recon.run_unrolled(hybrid, mask, maps)
    rows, sens = to_rows(hybrid), to_rows(maps)
    return lambda: recon.run_rows(rows, row_masks, sens)


def bench(model_paths: list[str], threads_list: list[int], repeats: int = 10, size: int = 256,
          coils: int = 8, acceleration: int = 4, max_rows_per_run: int = 0) -> list[dict]:
    """Every (model, threads) on the same slice, interleaved repetition by repetition (the
    machine may be shared: each configuration sees the same background load)."""
    from gadgets.numerics.calibration import espirit_maps
    from gadgets.numerics.pisf_inference import PisfReconstructor
    from tools.evaluation.harness import model_spec

    measured, mask, lines = bench_slice(size, coils, acceleration)
    configs = []
    for spec in model_paths:
        path, options, _ = model_spec(spec)
        for threads in threads_list:
            recon = PisfReconstructor(path, threads=threads, **{"max_rows_per_run": max_rows_per_run, **options})
            recon.reconstruct(measured, mask)                                  # warm-up
            configs.append({"model": spec, "threads": threads, "recon": recon,
                            "network": network_part(recon, measured, mask), "total": [], "net": [], "cal": []})
    for _ in range(repeats):
        for config in configs:
            recon = config["recon"]
            start = time.perf_counter()
            recon.reconstruct(measured, mask)
            config["total"].append(time.perf_counter() - start)
            start = time.perf_counter()
            config["network"]()
            config["net"].append(time.perf_counter() - start)
            if recon.scan_calibrated:
                start = time.perf_counter()
                espirit_maps(measured[:min(coils, recon.virtual_coils), lines], (size, size))
                config["cal"].append(time.perf_counter() - start)
    results = []
    for config in configs:
        recon = config["recon"]
        result = {"model": config["model"], "variant": recon.variant, "contract": recon.contract,
                  "threads": config["threads"], "slice": f"{size}x{size}x{coils}",
                  "reconstruct_median_s": float(np.median(config["total"])),
                  "reconstruct_min_s": float(np.min(config["total"])),
                  # contracts 1, 2: the ONNX run; contract 3: ONNX bank + numpy data consistency
                  "network_median_s": float(np.median(config["net"])), "network_min_s": float(np.min(config["net"])),
                  "repeats": repeats}
        if config["cal"]:
            result["calibration_median_s"] = float(np.median(config["cal"]))
        if recon.unrolled is not None:        # what ran: the trained counts or the spec's options
            result.update(init_cg=recon.unrolled.init_cg, block_cg=recon.unrolled.block_cg,
                          row_coils=recon.unrolled.row_coils, reflect_average=recon.reflect_average)
        results.append(result)
    return results


def bench_bart(repeats: int = 3, size: int = 256, coils: int = 8, acceleration: int = 4,
               threads: int = 1) -> dict:
    """BART on the same slice as the models (`bench_slice`), OMP_NUM_THREADS=threads: ecalib -m1
    -r 24 -k 4 -c 0.9, then pics -S -l1 -r 0.01 and pics -S -l2 -r 0.01; median seconds per step
    and per pipeline. The slice goes in BART's own order (tools/evaluation/bart.py: to_bart)."""
    import tempfile

    from tools.evaluation.bart import run_bart, single_thread_env, write_bart
    measured, _, _ = bench_slice(size, coils, acceleration)
    env = dict(single_thread_env(), OMP_NUM_THREADS=str(threads))
    times = {"ecalib": [], "pics_l1": [], "pics_l2": []}
    with tempfile.TemporaryDirectory(prefix="pisf_bench_bart_") as tmp:
        write_bart(f"{tmp}/ksp", measured)
        commands = {"ecalib": ["ecalib", "-m1", "-r", "24", "-k", "4", "-c", "0.9", "ksp", "sens"],
                    "pics_l1": ["pics", "-S", "-l1", "-r", "0.01", "ksp", "sens", "rec1"],
                    "pics_l2": ["pics", "-S", "-l2", "-r", "0.01", "ksp", "sens", "rec2"]}
        for _ in range(repeats):
            for step, args in commands.items():
                times[step].append(run_bart(args, env, cwd=tmp))
    median = {step: float(np.median(values)) for step, values in times.items()}
    return {"bart": True, "slice": f"{size}x{size}x{coils}", "threads": threads,
            **{f"{k}_median_s": v for k, v in median.items()},
            "ecalib_pics_l1_s": median["ecalib"] + median["pics_l1"],
            "ecalib_pics_l2_s": median["ecalib"] + median["pics_l2"], "repeats": repeats}


def growth(results: list[dict], key: str) -> dict:
    """Least-squares exponent p of time ~ size^p per (model, threads) over the sizes measured."""
    series: dict[tuple, list] = {}
    for result in results:
        if key in result:
            series.setdefault((result.get("model", "bart"), result["threads"]), []).append(
                (int(result["slice"].split("x")[0]), result[key]))
    fits = {}
    for (model, threads), points in series.items():
        if len(points) >= 2:
            sizes, seconds = np.log([p[0] for p in points]), np.log([p[1] for p in points])
            fits[f"{model} threads {threads}"] = round(float(np.polyfit(sizes, seconds, 1)[0]), 2)
    return fits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="PATH[:KEY=VALUE,...]",
                        help="ONNX models, each with optional run-time options as in `pisf evaluate --model`")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="onnxruntime thread counts")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per model and thread count")
    parser.add_argument("--bart", action="store_true", help="also time BART ecalib + pics on the same slice")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="slice sizes (size x size x coils)")
    parser.add_argument("--coils", type=int, default=8, help="receive coils of the slice")
    parser.add_argument("--max-rows-per-run", type=int, default=0,
                        help="rows per network run (0: all rows of the slice in one run)")


def _problem(args: argparse.Namespace) -> str | None:
    """The first argument the bench cannot run with, as `what; what to do` (None: all fine)."""
    from tools.evaluation.harness import model_spec

    for spec in args.models:
        try:
            path, _, _ = model_spec(spec)
        except ValueError as exc:
            return f"{exc}; see `pisf bench-model --help`"
        if not Path(path).is_file():
            return f"{path}: no such file; give an ONNX model (models/*.onnx)"
    for option, values in {"--threads": args.threads, "--repeats": [args.repeats], "--coils": [args.coils]}.items():
        if any(value < 1 for value in values):
            return f"{option} {min(values)}: must be at least 1; see `pisf bench-model --help`"
    if any(size < 16 or size % 2 for size in args.sizes):
        return (f"--sizes {' '.join(map(str, args.sizes))}: each must be even and at least 16; "
                f"see `pisf bench-model --help`")
    if args.max_rows_per_run < 0:
        return (f"--max-rows-per-run {args.max_rows_per_run}: must be 0 (all rows) or more; "
                f"see `pisf bench-model --help`")
    return None


def run(args: argparse.Namespace) -> int:
    from gadgets import limit_blas_threads
    from tools.cli import CommandError

    problem = _problem(args)
    if problem:
        raise CommandError(problem)
    limit_blas_threads()          # as in the server (OpenBLAS threads thrash on small matrices)
    import shutil
    with_bart = args.bart and shutil.which("bart") is not None
    if args.bart and not with_bart:
        print("bart not found: BART timing skipped")
    models, barts = [], []
    for size in args.sizes:
        for result in bench(args.models, args.threads, args.repeats, size, args.coils,
                            max_rows_per_run=args.max_rows_per_run):
            print(json.dumps(result), flush=True)
            models.append(result)
        for threads in args.threads if with_bart else ():
            result = bench_bart(max(1, min(args.repeats, 3)), size, args.coils, threads=threads)
            print(json.dumps(result), flush=True)
            barts.append(result)
            for model in (m for m in models if m["slice"] == result["slice"] and m["threads"] == threads):
                print(json.dumps({"ratio_to_bart_l1": model["model"], "slice": result["slice"], "threads": threads,
                                  "end_to_end_over_bart": round(model["reconstruct_median_s"]
                                                                / result["ecalib_pics_l1_s"], 3)}), flush=True)
    if len(args.sizes) > 1:
        print(json.dumps({"growth_exponent_end_to_end": growth(models, "reconstruct_median_s"),
                          "growth_exponent_bart_l1": growth(barts, "ecalib_pics_l1_s")}), flush=True)
    return 0

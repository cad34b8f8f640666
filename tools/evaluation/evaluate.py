"""`pisf evaluate`: PISF models vs zero-filled vs tuned BART on the real data in ../shared/data.

Every real dataset that allows 1D masks (tools/evaluation/datasets.py: phantom, brain16, cimax;
brain16_4ch and phantom_4ch, their cases with R <= 4, when named) with every case (equispaced
and random R 3/4/5/6/8 with an embedded centre; equispaced R 2/3/4 with
24 separate reference lines that are calibration only) through zero-filled, BART SENSE
(`pics -l2`) and BART l1-ESPIRiT (`pics -l1`), both tuned per case by PSNR against the
reference (an oracle that favours BART; tools/evaluation/bart.py), and every method: each
`--model` (ONNX, through PisfReconstructor with the reference lines as calibration) and each
`--method NAME=package.module:factory`. The harness is tools/evaluation/harness.py; from Python,
`run_evaluation(datasets, {name: method}, out)`.

Optional, `--datasets brain_poisson2d`: the already 2D-Poisson-undersampled brain through the
previous code path (zero-filled, BART l1-ESPIRiT over a lambda grid, each --model along both
axes averaged; reference = map 0 of the provided reconstruction).

Writes OUT/results.json, OUT/results.md and OUT/figure_<dataset>.png.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.evaluation.bart import bart_available, run_bart, single_thread_env, write_bart
from tools.rawdata.cfl import read_cfl
from tools.evaluation.datasets import DATASETS, DEFAULT_DATA, DEFAULT_DATASETS

POISSON_LAMBDAS = (0.001, 0.003, 0.01, 0.03)
POISSON2D = "brain_poisson2d"
DEFAULT_MODEL = "models/pisf_v3.onnx"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with the real data")
    opt_in = [name for name in DATASETS if name not in DEFAULT_DATASETS] + [POISSON2D]
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                        choices=list(DATASETS) + [POISSON2D],
                        help=f"datasets (default: {' '.join(DEFAULT_DATASETS)}; {', '.join(opt_in)} are opt-in)")
    parser.add_argument("--model", action="extend", nargs="+", default=None, metavar="PATH[:KEY=VALUE,...]",
                        help=f"ONNX model(s) to evaluate, repeatable (default {DEFAULT_MODEL}; "
                             "'none' for no model); run-time options after a colon, e.g. "
                             "models/pisf_v3.onnx:block_cg=8,init_cg=12 (keys: "
                             "init_cg, block_cg, row_coils, multi_shift, reflect_average, max_rows_per_run, "
                             "virtual_coils; absent ones keep the model's trained values)")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=MODULE:FACTORY",
                        help="a Python method: FACTORY() returns f(image_kspace, mask, calibration_kspace) "
                             "-> magnitude image (repeatable)")
    parser.add_argument("--out", default="runs/eval", help="output folder")
    parser.add_argument("--no-bart", action="store_true", help="skip the BART anchors")
    parser.add_argument("--bart-cache", default="runs/bart_cache", help="BART result cache ('' for none)")
    parser.add_argument("--quick", action="store_true", help="two cases per dataset (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--reflect-average", action="store_true",
                        help="PISF test-time augmentation: average with the k -> -k mirrored rows")


# ----------------------------------------------------------------------------- 2D Poisson brain
def load_brain_poisson(data_dir: Path):
    ksp = read_cfl(Path(data_dir) / "brain_8coil_poisson_ksp")                 # [1, 180, 230, 8]
    ref = read_cfl(Path(data_dir) / "brain_8coil_poisson_ref")                 # [1, 180, 230, 1, 2]
    kspace = np.transpose(ksp[0], (2, 0, 1)).astype(np.complex64)            # [8, 180, 230]
    reference = np.abs(ref[0, :, :, 0, 0]).astype(np.float64)                 # map 0
    mask2d = (np.abs(kspace).sum(0) > 0).astype(np.float32)
    return kspace, mask2d, reference


def bart_l1_lambda_grid(kspace: np.ndarray, calibration_size: int, lambdas, reference: np.ndarray) -> dict:
    """l1-ESPIRiT (ecalib -m1 -r N -k 4 -c 0.9; pics -S -l1 -r lambda) of K[coils, ny, nx], best
    PSNR over `lambdas` (oracle)."""
    from tools.evaluation.metrics import psnr, scale_match
    env = single_thread_env()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pisf_bart_") as tmp:
        tmp = Path(tmp)
        write_bart(tmp / "ksp", kspace, phase_first=True)   # an anchor: images come back (ny, nx)
        calib_s = run_bart(["ecalib", "-m1", "-r", calibration_size, "-k", "4", "-c", "0.9",
                            tmp / "ksp", tmp / "sens"], env)
        for lam in lambdas:
            start = time.perf_counter()
            run_bart(["pics", "-S", "-l1", "-r", lam, tmp / "ksp", tmp / "sens", tmp / "rec"], env)
            image = np.abs(read_cfl(tmp / "rec").reshape(kspace.shape[1:]))
            results[lam] = (image, time.perf_counter() - start)
    scores = {lam: psnr(reference, scale_match(img, reference)) for lam, (img, _) in results.items()}
    best = max(scores, key=scores.get)
    return {"image": results[best][0], "lambda": best, "psnr_by_lambda": scores,
            "seconds": calib_s + results[best][1]}


def evaluate_poisson2d(data_dir: Path, models: dict, use_bart: bool, log=print) -> list[dict]:
    """The 2D-Poisson brain row (previous code path), in the harness's row format."""
    from gadgets.numerics.pisf_inference import zero_filled
    from tools.evaluation.harness import case_metrics
    from tools.evaluation.metrics import foreground_mask
    if not (Path(data_dir) / "brain_8coil_poisson_ksp.cfl").is_file():
        log(f"skipping dataset {POISSON2D}: {Path(data_dir) / 'brain_8coil_poisson_ksp.cfl'} not found")
        return []
    kspace, mask2d, reference = load_brain_poisson(data_dir)
    fg = foreground_mask(reference)
    row = {"dataset": POISSON2D, "case": "poisson2d_21x21_centre", "kind": "poisson2d",
           "R": round(float(mask2d.size / mask2d.sum()), 2), "R_achieved": round(float(mask2d.size / mask2d.sum()), 2),
           "layout": "embedded", "image_lines": None, "reference_lines": 21, "ny": kspace.shape[1],
           "nx": kspace.shape[2], "coils": kspace.shape[0], "metrics": {}, "seconds": {}, "bart": {}}
    start = time.perf_counter()
    row["metrics"]["zero_filled"] = case_metrics(reference, zero_filled(kspace, mask2d), fg)
    row["seconds"]["zero_filled"] = time.perf_counter() - start
    if use_bart:
        bart = bart_l1_lambda_grid(kspace, 21, POISSON_LAMBDAS, reference)
        row["metrics"]["bart_l1_espirit"] = case_metrics(reference, bart["image"], fg)
        row["seconds"]["bart_l1_espirit"] = bart["seconds"]
        row["bart"]["bart_l1_espirit"] = {
            "settings": {"regulariser": "l1", "maps": 1, "crop": 0.9, "lambda": bart["lambda"],
                         "iterations": 30, "calib_region": "21", "kernel": 4},
            "psnr_by_lambda": bart["psnr_by_lambda"], "seconds": bart["seconds"],
            "oracle": "lambda from a 4-point grid by PSNR against the reference"}
    for name, recon in models.items():
        start = time.perf_counter()
        image = recon.reconstruct(kspace, mask2d)
        row["seconds"][name] = time.perf_counter() - start
        row["metrics"][name] = case_metrics(reference, image, fg)
    log(f"  {POISSON2D} R {row['R']}: " + ", ".join(f"{n} {m['psnr']:.2f}" for n, m in row["metrics"].items()))
    return [row]


# ----------------------------------------------------------------------------- main
def model_name(base: str, taken) -> str:
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def run(args: argparse.Namespace) -> int:
    from tools.evaluation.datasets import load_datasets
    from tools.evaluation.harness import method_from_spec, model_method, model_spec, run_evaluation

    data_dir = Path(args.data)
    if not data_dir.exists():
        print(f"no real data at {data_dir}: skipping the evaluation")
        return 0
    model_specs = [DEFAULT_MODEL] if args.model is None else [m for m in args.model if m.lower() != "none"]
    methods, reconstructors, models = {}, {}, {}
    for spec in model_specs:
        path, options, base = model_spec(spec)
        if not Path(path).is_file():
            print(f"model {path} not found")
            return 1
        name = model_name(base, methods)
        methods[name] = model_method(path, threads=args.threads,
                                     **{"reflect_average": args.reflect_average, **options})
        reconstructors[name] = methods[name].reconstructor
        models[name] = {"path": path, "options": options, "metadata": methods[name].metadata}
    for spec in args.method:
        name, method = method_from_spec(spec)
        methods[name] = method
    use_bart = not args.no_bart
    if use_bart and not bart_available():
        print("bart not found: running without the BART anchors")
        use_bart = False
    if use_bart:
        print("BART anchors: per-case oracle tuning by PSNR against the fully sampled reference "
              "(favours BART)")
    one_d = [d for d in args.datasets if d != POISSON2D]
    start = time.perf_counter()
    datasets = load_datasets(data_dir, one_d) if one_d else []
    extra = evaluate_poisson2d(data_dir, reconstructors, use_bart) if POISSON2D in args.datasets else []
    info = {"models": models,
            "command": " ".join(["pisf"] + sys.argv[1:])}
    extra_datasets = [{"name": POISSON2D, "source": "brain_8coil_poisson_ksp.cfl",
                       "description": "in-vivo brain, 8 coils, already 2D-Poisson undersampled (previous code path)",
                       "shape": [8, 180, 230]}] if extra else []
    summary = run_evaluation(datasets, methods, Path(args.out), use_bart=use_bart, quick=args.quick,
                             bart_cache=args.bart_cache or None, seed=args.seed, info=info,
                             extra_rows=extra, extra_datasets=extra_datasets)
    summary_seconds = time.perf_counter() - start
    print(f"evaluation: {len(summary['rows'])} cases in {summary_seconds:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="pisf evaluate")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))

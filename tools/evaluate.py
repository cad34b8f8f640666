"""`pisf evaluate`: PISF vs zero-filled vs BART l1-ESPIRiT on the real data in ../shared/data.

* phantom_8coil_full.mat: fully sampled 8-coil phantom; k-space by the centred 2D FFT;
  retrospective 1D masks along ky at R = 4, 6, 8 (equispaced and random, fastMRI-style centre
  fractions 8 %, 6 %, 4 %; R counts the centre lines).
* brain_8coil_poisson: already 2D-Poisson-undersampled k-space; the 1D model runs along both
  axes and the estimates are averaged; reference = map 0 of the provided reconstruction.
Metrics (tools/metrics.py) on RSS magnitude after a least-squares scale match. BART's lambda is
picked per case from a small grid by PSNR against the reference (an oracle choice that favours
BART). Writes OUT/results.md, OUT/results.json and OUT/comparison.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CENTRE_FRACTIONS = {4: 0.08, 6: 0.06, 8: 0.04}
BART_LAMBDAS = (0.001, 0.003, 0.01, 0.03)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/pisf_fast.onnx", help="PISF ONNX model")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with the real data")
    parser.add_argument("--out", default="runs/eval", help="output folder")
    parser.add_argument("--accelerations", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(BART_LAMBDAS))
    parser.add_argument("--no-bart", action="store_true", help="skip BART (faster)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--reflect-average", action="store_true",
                        help="PISF test-time augmentation: average with the k -> -k mirrored rows")


# ----------------------------------------------------------------------------- masks
def fastmri_mask(n: int, acceleration: int, centre_fraction: float, kind: str,
                 rng: np.random.Generator) -> np.ndarray:
    """1D mask [n] with a fully sampled centre of round(n * centre_fraction) lines and outer
    lines such that about n / acceleration lines are sampled in total (fastMRI's random mask
    and its equispaced-fraction variant)."""
    centre_lines = int(round(n * centre_fraction))
    mask = np.zeros(n, dtype=np.float32)
    start = (n - centre_lines + 1) // 2
    mask[start:start + centre_lines] = 1
    if kind == "random":
        prob = (n / acceleration - centre_lines) / (n - centre_lines)
        mask[rng.uniform(size=n) < prob] = 1
    elif kind == "equispaced":
        adjusted = acceleration * (centre_lines - n) / (centre_lines * acceleration - n)
        offset = rng.integers(0, max(1, round(adjusted)))
        mask[np.round(np.arange(offset, n - 1, adjusted)).astype(int)] = 1
    else:
        raise ValueError(kind)
    return mask


# ----------------------------------------------------------------------------- BART
def write_cfl(stem: Path, array: np.ndarray) -> None:
    dims = list(array.shape) + [1] * (16 - array.ndim)
    stem.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asarray(array, dtype=np.complex64).ravel(order="F").tofile(stem.with_suffix(".cfl"))


def read_cfl(stem: Path) -> np.ndarray:
    lines = stem.with_suffix(".hdr").read_text().splitlines()
    dims = [int(d) for d in lines[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(stem.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims, order="F")


def bart_available() -> bool:
    return shutil.which("bart") is not None


def bart_pics(kspace: np.ndarray, calibration_size: int, lambdas, reference: np.ndarray) -> dict:
    """l1-ESPIRiT (ecalib -m1 -r N -k 4 -c 0.9; pics -S -l1 -r lambda) of K[coils, ny, nx];
    returns the best-PSNR image over `lambdas` plus every lambda's PSNR and the time."""
    from tools.metrics import psnr, scale_match
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="pisf_bart_") as tmp:
        tmp = Path(tmp)
        write_cfl(tmp / "ksp", np.transpose(kspace, (1, 2, 0))[:, :, None, :])   # x, y, 1, coil
        start = time.perf_counter()
        subprocess.run(["bart", "ecalib", "-m1", "-r", str(calibration_size), "-k", "4", "-c", "0.9",
                        str(tmp / "ksp"), str(tmp / "sens")], check=True, env=env, capture_output=True)
        calib_s = time.perf_counter() - start
        for lam in lambdas:
            start = time.perf_counter()
            subprocess.run(["bart", "pics", "-S", "-l1", "-r", str(lam), str(tmp / "ksp"), str(tmp / "sens"),
                            str(tmp / "rec")], check=True, env=env, capture_output=True)
            image = np.abs(read_cfl(tmp / "rec").reshape(kspace.shape[1:]))
            results[lam] = (image, time.perf_counter() - start)
    scores = {lam: psnr(reference, scale_match(img, reference)) for lam, (img, _) in results.items()}
    best = max(scores, key=scores.get)
    return {"image": results[best][0], "lambda": best, "psnr_by_lambda": scores,
            "seconds": calib_s + results[best][1]}


# ----------------------------------------------------------------------------- data
def load_phantom(data_dir: Path):
    import h5py
    with h5py.File(data_dir / "phantom_8coil_full.mat", "r") as f:
        raw = f["data"][()]
    coil_images = (raw["real"] + 1j * raw["imag"]).astype(np.complex64)        # [8, 256, 256]
    return coil_images


def load_brain(data_dir: Path):
    ksp = read_cfl(data_dir / "brain_8coil_poisson_ksp")                       # [1, 180, 230, 8]
    ref = read_cfl(data_dir / "brain_8coil_poisson_ref")                       # [1, 180, 230, 1, 2]
    kspace = np.transpose(ksp[0], (2, 0, 1)).astype(np.complex64)            # [8, 180, 230]
    reference = np.abs(ref[0, :, :, 0, 0])                                     # map 0
    mask2d = (np.abs(kspace).sum(0) > 0).astype(np.float32)
    return kspace, mask2d, reference.astype(np.float64)


# ----------------------------------------------------------------------------- figure
def save_figure(path: Path, panels: list[list[np.ndarray]], labels: list[str]) -> None:
    """Grid of magnitude panels (each row: reference, ZF, BART, PISF, then x5 error maps)."""
    from PIL import Image, ImageDraw
    tiles = []
    for row in panels:
        ref = row[0]
        peak = float(ref.max())
        shown = [np.clip(p / peak, 0, 1) for p in row]
        tiles.append(np.concatenate(shown, axis=1))
    width = max(t.shape[1] for t in tiles)
    canvas = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]))) for t in tiles], axis=0)
    image = Image.fromarray((canvas * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    y = 0
    for tile, label in zip(tiles, labels):
        draw.text((3, y + 2), label, fill=(255, 255, 0))
        y += tile.shape[0]
    image.save(path)


# ----------------------------------------------------------------------------- main
def evaluate_all(model_path: str, data_dir: Path, out: Path, accelerations, lambdas, use_bart: bool,
                 threads: int = 1, seed: int = 0, reflect_average: bool = False) -> dict:
    from gadgets.numerics.coils import root_sum_of_squares
    from gadgets.numerics.fft import ifftc
    from gadgets.numerics.pisf_inference import PisfReconstructor, kspace_from_coil_images, zero_filled
    from tools.metrics import all_metrics, foreground_mask, scale_match

    out.mkdir(parents=True, exist_ok=True)
    recon = PisfReconstructor(model_path, threads=threads, reflect_average=reflect_average)
    use_bart = use_bart and bart_available()
    rng = np.random.default_rng(seed)
    rows, panels, labels = [], [], []

    def add(dataset, mask_name, accel, reference, fg, zf, bart, pisf, pisf_s):
        entry = {"dataset": dataset, "mask": mask_name, "R": accel,
                 "zero_filled": all_metrics(reference, zf, fg), "pisf": all_metrics(reference, pisf, fg),
                 "pisf_seconds": pisf_s}
        if bart is not None:
            entry["bart"] = all_metrics(reference, bart["image"], fg)
            entry["bart_lambda"] = bart["lambda"]
            entry["bart_psnr_by_lambda"] = bart["psnr_by_lambda"]
            entry["bart_seconds"] = bart["seconds"]
        rows.append(entry)
        shown = [reference] + [scale_match(img, reference) for img in
                               (zf, bart["image"] if bart is not None else np.zeros_like(zf), pisf)]
        panels.append(shown + [5 * np.abs(s - reference) for s in shown[1:]])
        labels.append(f"{dataset} {mask_name} R{accel}")
        print(f"{dataset:8s} {mask_name:11s} R{accel}: ZF {entry['zero_filled']['psnr']:.2f} dB, "
              + (f"BART {entry['bart']['psnr']:.2f} dB (lambda {bart['lambda']}), " if bart else "")
              + f"PISF {entry['pisf']['psnr']:.2f} dB ({pisf_s:.2f} s)", flush=True)

    phantom_path = data_dir / "phantom_8coil_full.mat"
    if phantom_path.exists():
        coil_images = load_phantom(data_dir)
        kspace = kspace_from_coil_images(coil_images)
        reference = root_sum_of_squares(coil_images).astype(np.float64)
        fg = foreground_mask(reference)
        ny = kspace.shape[1]
        for accel in accelerations:
            fraction = CENTRE_FRACTIONS.get(accel, 0.32 / accel)
            for kind in ("equispaced", "random"):
                mask = fastmri_mask(ny, accel, fraction, kind, rng)
                zf = zero_filled(kspace, mask)
                start = time.perf_counter()
                pisf = recon.reconstruct(kspace, mask)
                pisf_s = time.perf_counter() - start
                bart = None
                if use_bart:
                    bart = bart_pics(kspace * mask[None, :, None], int(round(ny * fraction)), lambdas, reference)
                add("phantom", kind, accel, reference, fg, zf, bart, pisf, pisf_s)
    else:
        print(f"skipping the phantom: {phantom_path} not found")

    brain_path = data_dir / "brain_8coil_poisson_ksp.cfl"
    if brain_path.exists():
        kspace, mask2d, reference = load_brain(data_dir)
        fg = foreground_mask(reference)
        accel = round(float(mask2d.size / mask2d.sum()), 1)
        zf = zero_filled(kspace, mask2d)
        start = time.perf_counter()
        pisf = recon.reconstruct(kspace, mask2d)
        pisf_s = time.perf_counter() - start
        bart = bart_pics(kspace, 21, lambdas, reference) if use_bart else None
        add("brain", "poisson2d", accel, reference, fg, zf, bart, pisf, pisf_s)
    else:
        print(f"skipping the brain: {brain_path} not found")

    if not rows:
        return {"rows": []}
    save_figure(out / "comparison.png", panels, labels)
    summary = {"model": str(model_path), "variant": recon.variant, "metadata": recon.metadata,
               "reflect_average": reflect_average,
               "bart": use_bart, "lambdas": list(lambdas), "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "results.md").write_text(markdown_table(rows))
    print(markdown_table(rows))
    return summary


def markdown_table(rows: list[dict]) -> str:
    head = ("| data | mask | R | ZF PSNR | BART PSNR | PISF PSNR | ZF SSIM | BART SSIM | PISF SSIM "
            "| ZF NMSE | BART NMSE | PISF NMSE | PISF fg-PSNR | BART fg-PSNR | BART lambda | PISF s | BART s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        z, p, b = r["zero_filled"], r["pisf"], r.get("bart")

        def fmt(m, key, spec):
            return format(m[key], spec) if m else "-"
        lines.append(" | ".join([
            f"| {r['dataset']}", r["mask"], str(r["R"]),
            fmt(z, "psnr", ".2f"), fmt(b, "psnr", ".2f"), fmt(p, "psnr", ".2f"),
            fmt(z, "ssim", ".4f"), fmt(b, "ssim", ".4f"), fmt(p, "ssim", ".4f"),
            fmt(z, "nmse", ".4f"), fmt(b, "nmse", ".4f"), fmt(p, "nmse", ".4f"),
            fmt(p, "psnr_fg", ".2f"), fmt(b, "psnr_fg", ".2f"),
            str(r.get("bart_lambda", "-")), f"{r['pisf_seconds']:.2f}",
            f"{r['bart_seconds']:.2f}" if b else "-"]) + " |")
    return head + "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data)
    if not data_dir.exists():
        print(f"no real data at {data_dir}: skipping the evaluation")
        return 0
    if not Path(args.model).exists():
        print(f"model {args.model} not found")
        return 1
    evaluate_all(args.model, data_dir, Path(args.out), args.accelerations, args.lambdas,
                 use_bart=not args.no_bart, threads=args.threads, seed=args.seed,
                 reflect_average=args.reflect_average)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="pisf evaluate")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))

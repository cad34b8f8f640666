"""Real-data evaluation harness behind `pisf evaluate`: every case of every 1D dataset
(tools/evaluation/datasets.py) through zero-filled, the two tuned BART anchors (tools/evaluation/bart.py)
and any number of pluggable methods.

A method is any callable

    method(image_kspace, mask, calibration_kspace) -> magnitude image [ny, nx]

with image_kspace [C, ny, nx] complex64 (the image lines, zeros elsewhere), mask [ny] float32
(1 on the image lines) and calibration_kspace [C, ny, nx] complex64 (the reference lines, zeros
elsewhere; for embedded cases these lines are also in image_kspace, for separate-reference
cases they are not: calibrate on them, never insert them as data). The reference-line indices
are `tools.evaluation.datasets.sampled_lines(calibration_kspace)`. Plug methods in with

    from tools.evaluation.harness import run_evaluation
    from tools.evaluation.datasets import load_datasets
    run_evaluation(load_datasets(), {"my_method": my_method}, out=Path("runs/eval"))

or on the command line with `pisf evaluate --model MODEL.onnx` (an ONNX model through
`model_method`; `--model MODEL.onnx:block_cg=8,reflect_average=1` with run-time options, see
`model_spec`) or `--method NAME=package.module:factory` (factory() returns a method).
Metrics: tools/evaluation/metrics.py `all_metrics` (after a least-squares scale match: PSNR, SSIM, NMSE,
foreground PSNR) plus `foreground_ssim` (SSIM over the object only) as `ssim_fg`.
Writes OUT/results.json, OUT/results.md and OUT/figure_<dataset>.png.
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tools.evaluation.bart import CACHE_DIR
from tools.evaluation.datasets import Case, Dataset, dataset_cases, sampled_lines, undersample

Method = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
ZERO_FILLED = "zero_filled"


# ----------------------------------------------------------------------------- methods
def zero_filled(image_kspace: np.ndarray, mask: np.ndarray, calibration_kspace: np.ndarray) -> np.ndarray:
    """RSS of the zero-filled coil images of the image lines only (reference lines of a
    separate-reference case are not inserted): the runtime's zero filling as a method."""
    from gadgets.numerics.pisf_inference import zero_filled as zero_filled_image
    return zero_filled_image(np.asarray(image_kspace), np.asarray(mask) > 0.5)


def model_method(model_path: str | Path, threads: int = 1, **options) -> Method:
    """An ONNX PISF model (either contract) as a method, through
    PisfReconstructor.reconstruct(kspace, mask, reference_kspace=calibration k-space grid,
    reference_lines=its lines): contract 1 compresses coils on those lines, contract 2
    calibrates its coil maps on them."""
    from gadgets.numerics.pisf_inference import PisfReconstructor
    recon = PisfReconstructor(model_path, threads=threads, **options)

    def method(image_kspace, mask, calibration_kspace):
        return recon.reconstruct(image_kspace, mask, reference_kspace=calibration_kspace,
                                 reference_lines=sampled_lines(calibration_kspace))

    method.metadata = dict(recon.metadata)
    method.reconstructor = recon
    return method


# run-time options of a PISF model (`model_spec`): PisfReconstructor keywords, and contract 3's
# UnrolledPisf options, which PisfReconstructor takes as its `unrolled` dict
MODEL_OPTIONS = {"init_cg": int, "block_cg": int, "row_coils": int, "multi_shift": bool,
                 "reflect_average": bool, "max_rows_per_run": int, "virtual_coils": int}
UNROLLED_OPTIONS = ("init_cg", "block_cg", "row_coils", "multi_shift")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def model_spec(spec: str) -> tuple[str, dict, str]:
    """'PATH' or 'PATH:key=value[,key=value...]' (keys in MODEL_OPTIONS) -> (path, PisfReconstructor
    keywords, method name: the file's stem plus the options as written, e.g. 'pisf_v3:block_cg=8')."""
    head, colon, tail = spec.rpartition(":")
    if not colon or "=" not in tail or Path(spec).is_file():
        return spec, {}, Path(spec).stem
    options = {}
    for item in tail.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if key not in MODEL_OPTIONS or not equals or not value:
            raise ValueError(f"model option {item!r} in {spec!r}: expected key=value with key in "
                             f"{', '.join(MODEL_OPTIONS)}")
        options[key] = _option_value(key, value)
    unrolled = {key: options.pop(key) for key in UNROLLED_OPTIONS if key in options}
    if unrolled:
        options["unrolled"] = unrolled
    return head, options, f"{Path(head).stem}:{tail}"


def _option_value(key: str, text: str):
    if MODEL_OPTIONS[key] is bool:
        if text.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"model option {key}={text}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
        return text.lower() in TRUE_WORDS
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"model option {key}={text}: expected an integer") from None


def method_from_spec(spec: str) -> tuple[str, Method]:
    """'NAME=package.module:factory' -> (NAME, factory())."""
    name, _, target = spec.partition("=")
    module_name, _, attr = target.partition(":")
    if not name or not module_name or not attr:
        raise ValueError(f"--method expects NAME=package.module:factory, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return name, factory()


# ----------------------------------------------------------------------------- one case
def case_metrics(reference: np.ndarray, image: np.ndarray, foreground: np.ndarray) -> dict:
    """all_metrics (psnr, ssim, nmse, psnr_fg; scale-matched) plus ssim_fg."""
    from tools.evaluation.metrics import all_metrics, foreground_ssim, scale_match
    metrics = all_metrics(reference, image, foreground)
    metrics["ssim_fg"] = foreground_ssim(reference, scale_match(image, reference), foreground)
    return metrics


def evaluate_case(dataset: Dataset, case: Case, methods: dict[str, Method], use_bart: bool = True,
                  bart_cache: str | Path | None = CACHE_DIR, log=print) -> tuple[dict, dict[str, np.ndarray]]:
    """(result row, {method: image}) of one case; zero-filled first, then BART, then `methods`.
    bart_cache: folder of the BART result cache (None: no cache)."""
    from tools.evaluation.metrics import foreground_mask
    reference = dataset.reference
    foreground = foreground_mask(reference)
    image_kspace, calibration_kspace = undersample(case, dataset.kspace)
    row = {"dataset": dataset.name, "case": case.name, "kind": case.kind, "R": case.R,
           "R_achieved": round(case.r_achieved, 3), "layout": case.layout,
           "image_lines": int(case.mask.sum()), "reference_lines": case.n_reference,
           "ny": case.ny, "nx": int(dataset.kspace.shape[2]), "coils": int(dataset.kspace.shape[0]),
           "metrics": {}, "seconds": {}, "bart": {}}
    images = {}

    def record(name, image, seconds):
        image = np.asarray(image, dtype=np.float64)
        if image.shape != reference.shape:
            raise ValueError(f"{name} returned {image.shape}, expected {reference.shape}")
        images[name] = image
        row["metrics"][name] = case_metrics(reference, image, foreground)
        row["seconds"][name] = seconds

    start = time.perf_counter()
    record(ZERO_FILLED, zero_filled(image_kspace, case.mask, calibration_kspace), time.perf_counter() - start)
    if use_bart:
        from tools.evaluation.bart import bart_anchors
        anchors = bart_anchors(image_kspace, calibration_kspace, reference, cache_dir=bart_cache, log=log)
        for name, anchor in anchors.items():
            record(name, anchor.image, anchor.seconds)
            row["bart"][name] = anchor.summary()
    for name, method in methods.items():
        start = time.perf_counter()
        image = method(image_kspace.copy(), case.mask.copy(), calibration_kspace.copy())
        record(name, image, time.perf_counter() - start)
    log(f"  {dataset.name:8s} {case.name:26s} R {case.r_achieved:4.2f}: "
        + ", ".join(f"{n} {m['psnr']:.2f}" for n, m in row["metrics"].items()), flush=True)
    return row, images


# ----------------------------------------------------------------------------- all
def run_evaluation(datasets: list[Dataset], methods: dict[str, Method], out: str | Path,
                   use_bart: bool = True, quick: bool = False, bart_cache: str | Path | None = CACHE_DIR,
                   seed: int = 0, figure: bool = True, log=print, info: dict | None = None,
                   extra_rows: list[dict] | None = None, extra_datasets: list[dict] | None = None) -> dict:
    """Every case of every dataset; writes OUT/results.json, results.md, figure_<dataset>.png.
    extra_rows / extra_datasets: rows (same format) and dataset descriptions evaluated elsewhere
    (the 2D-Poisson brain). Returns the summary written to results.json."""
    from tools.cli import created_directory

    out = created_directory(out)
    if use_bart:
        from tools.evaluation.bart import bart_available
        if not bart_available():
            log("bart not found: running without the BART anchors")
            use_bart = False
    start = time.perf_counter()
    rows, figures = [], []
    for dataset in datasets:
        log(f"{dataset.name}: {dataset.description} ({dataset.source})")
        panels = []
        for case in dataset_cases(dataset, quick=quick, seed=seed):
            row, images = evaluate_case(dataset, case, methods, use_bart, bart_cache, log=log)
            rows.append(row)
            panels.append((case, images))
        if figure and panels:
            path = out / f"figure_{dataset.name}.png"
            save_figure(path, dataset, panels)
            figures.append(str(path))
    rows += extra_rows or []
    summary = {
        "datasets": [{"name": d.name, "source": d.source, "description": d.description,
                      "shape": list(d.kspace.shape)} for d in datasets] + list(extra_datasets or []),
        "methods": list(methods), "bart": use_bart, "quick": quick, "seed": seed,
        "bart_tuning": ("per-case oracle tuning by PSNR against the fully sampled reference "
                        "(favours BART); see tools/evaluation/bart.py") if use_bart else None,
        "total_seconds": time.perf_counter() - start, "figures": figures, "rows": rows,
        **(info or {}),
    }
    summary["summary"] = method_summary(rows)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    (out / "results.md").write_text(markdown_report(summary))
    log(markdown_report(summary))
    return summary


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------- reports
def _anchor_names(rows) -> list[str]:
    names = []
    for row in rows:
        for name in row["bart"]:
            if name not in names:
                names.append(name)
    return names


def _method_names(rows) -> list[str]:
    names = []
    for row in rows:
        for name in row["metrics"]:
            if name not in names:
                names.append(name)
    return names


def method_summary(rows: list[dict]) -> dict:
    """Per method: mean PSNR / SSIM, and against the best tuned BART of each case (PSNR margin,
    cases meeting the issue-10 target PSNR >= best BART + 1 dB and SSIM >= best BART SSIM)."""
    anchors = _anchor_names(rows)
    out = {}
    for name in _method_names(rows):
        scored = [r for r in rows if name in r["metrics"]]
        entry = {"cases": len(scored),
                 "mean_psnr": float(np.mean([r["metrics"][name]["psnr"] for r in scored])),
                 "mean_ssim": float(np.mean([r["metrics"][name]["ssim"] for r in scored])),
                 "mean_ssim_fg": float(np.mean([r["metrics"][name]["ssim_fg"] for r in scored]))}
        with_bart = [r for r in scored if all(a in r["metrics"] for a in anchors) and anchors]
        if with_bart and name not in anchors:
            margins = [r["metrics"][name]["psnr"] - max(r["metrics"][a]["psnr"] for a in anchors) for r in with_bart]
            ssim_ok = [r["metrics"][name]["ssim"] >= max(r["metrics"][a]["ssim"] for a in anchors) for r in with_bart]
            entry.update({"mean_margin_vs_best_bart_db": float(np.mean(margins)),
                          "min_margin_vs_best_bart_db": float(np.min(margins)),
                          "cases_meeting_target": int(sum(m >= 1.0 and s for m, s in zip(margins, ssim_ok)))})
        out[name] = entry
    return out


def markdown_report(summary: dict) -> str:
    rows = summary["rows"]
    if not rows:
        return "No dataset found: nothing evaluated.\n"
    methods = _method_names(rows)
    anchors = _anchor_names(rows)
    lines = ["# Real-data evaluation", ""]
    for d in summary["datasets"]:
        lines.append(f"- **{d['name']}**: {d['description']} (`{d['source']}`, {'x'.join(map(str, d['shape']))})")
    lines.append("")
    if summary.get("bart"):
        lines += ["BART anchors: " + summary["bart_tuning"] + ". Settings: m = ESPIRiT maps, c = eigenvalue "
                  "crop, r = lambda, i = iterations.", ""]
    lines += ["PSNR (dB) / SSIM after a least-squares scale match. R = ny / image lines (centre "
              "included); separate = 24 reference lines used for calibration only.", ""]
    head = ["dataset", "case", "R", "layout"] + [f"{m} PSNR / SSIM" for m in methods]
    head += [f"{a} settings" for a in anchors] + ["seconds (" + ", ".join(m for m in methods if m != ZERO_FILLED) + ")"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in rows:
        cells = [r["dataset"], r["case"], f"{r['R_achieved']:.2f}", r["layout"]]
        for m in methods:
            metric = r["metrics"].get(m)
            cells.append(f"{metric['psnr']:.2f} / {metric['ssim']:.3f}" if metric else "-")
        for a in anchors:
            b = r["bart"].get(a)
            cells.append(_settings_text(b["settings"]) if b else "-")
        cells.append(" / ".join(f"{r['seconds'][m]:.2f}" if m in r["seconds"] else "-"
                                for m in methods if m != ZERO_FILLED))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| method | cases | mean PSNR | mean SSIM | mean fg-SSIM | mean / min PSNR margin vs best BART | "
              "cases >= best BART + 1 dB and SSIM >= BART |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["summary"].items():
        margin = (f"{s['mean_margin_vs_best_bart_db']:+.2f} / {s['min_margin_vs_best_bart_db']:+.2f}"
                  if "mean_margin_vs_best_bart_db" in s else "-")
        target = f"{s['cases_meeting_target']} of {s['cases']}" if "cases_meeting_target" in s else "-"
        lines.append(f"| {name} | {s['cases']} | {s['mean_psnr']:.2f} | {s['mean_ssim']:.3f} | {s['mean_ssim_fg']:.3f} "
                     f"| {margin} | {target} |")
    lines += ["", "fg-SSIM: SSIM averaged over the object only (results.json `ssim_fg`; the whole-image SSIM "
              "also scores how the background noise is rendered).", "",
              f"Total time {summary['total_seconds']:.0f} s. Seconds: BART = ecalib + pics at the chosen "
              "settings (measured single-threaded; tuning time in results.json), methods = the call.", ""]
    if summary.get("figures"):
        lines += ["Figures: " + ", ".join(Path(f).name for f in summary["figures"]), ""]
    return "\n".join(lines)


def _settings_text(s: dict) -> str:
    crop = "none" if s["crop"] is None else f"{s['crop']:g}"
    return f"m{s['maps']} c{crop} r{s['lambda']:.3g} i{s['iterations']}"


# ----------------------------------------------------------------------------- figure
def save_figure(path: Path, dataset: Dataset, panels: list[tuple[Case, dict]]) -> None:
    """One row per case: reference, every reconstruction (zero-filled, BART, methods), then x5
    error maps |recon - reference| of each (scale-matched; grey scale = reference max)."""
    from PIL import Image, ImageDraw
    from tools.evaluation.metrics import scale_match
    reference = dataset.reference
    peak = float(reference.max())
    names = list(panels[0][1])
    ny, nx = reference.shape
    pad = 14
    tiles = []
    for case, images in panels:
        recons = [scale_match(images[n], reference) for n in names]
        row = [reference] + recons + [5 * np.abs(r - reference) for r in recons]
        tiles.append(np.concatenate([np.clip(p / peak, 0, 1) for p in row], axis=1))
    columns = 1 + 2 * len(names)
    canvas = np.zeros((len(tiles) * (ny + pad) + pad, columns * nx), dtype=np.float64)
    for i, tile in enumerate(tiles):
        y = pad + i * (ny + pad)
        canvas[y:y + ny, :tile.shape[1]] = tile
    image = Image.fromarray((canvas * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    titles = ["reference"] + names + [f"x5 error {n}" for n in names]
    for c, title in enumerate(titles):
        draw.text((c * nx + 2, 1), title[: max(4, nx // 6)], fill=(255, 255, 0))
    for i, (case, images) in enumerate(panels):
        draw.text((2, pad + i * (ny + pad) + 2), f"{case.name} R{case.r_achieved:.1f}", fill=(0, 255, 0))
    image.save(path)

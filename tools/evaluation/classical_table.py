"""The classical chains against BART, from a `pisf evaluate` run with the chains' cores as methods:

    pisf evaluate --model none --method classical=tools.evaluation.classical:classical \
                  --method grappa=tools.evaluation.classical:grappa \
                  --method sense=tools.evaluation.classical:sense \
                  --method sense_l1=tools.evaluation.classical:sense_l1 --out runs/eval_classical
    pisf classical-table runs/eval_classical

Per case: zero-filled, BART SENSE-l2 tuned per case against the reference (the oracle of
tools/evaluation/bart.py), BART SENSE-l2 at one fixed setting for every case (`ecalib -m1 -c 0.9`,
`pics -l2 -r 0.01`, 100 iterations: like the chains, no per-case tuning; from the anchors' disk
cache, computed when missing), the sense and grappa chains' cores; PSNR / SSIM and seconds
(BART: ecalib + pics, single-threaded; ours: the call); with a sense_l1 method also BART
l1-ESPIRiT (tuned) against it; then the mean PSNR per dataset and layout of every method and the
issue-18 targets (classical against tuned BART SENSE-l2, sense_l1 against tuned BART l1). Writes OUT/classical_table.md. With a `classical` method (the
classical chain's core, tools/evaluation/classical.py) also its column and summary.

`pisf classical-table --lambda-study OUT --datasets ...` instead sweeps the sense core's Tikhonov
lambda per case (quarter decades 1e-4..1, the chain's calibration) against the reference: the
per-case oracle, the automatic choice (gadgets/numerics/regularisation.py) and the fixed 0.01;
writes OUT/lambda_study.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FIXED = {"maps": 1, "crop": 0.9, "lambda": 0.01}


def fixed_bart(rows: list[dict], data_dir: Path, cache: str) -> dict[tuple[str, str], dict]:
    """(dataset, case) -> {metrics, seconds} of BART SENSE-l2 at FIXED on every row's case."""
    from tools.evaluation.bart import BartCase
    from tools.evaluation.datasets import dataset_cases, load_datasets, undersample
    from tools.evaluation.metrics import all_metrics, foreground_mask

    out = {}
    for dataset in load_datasets(data_dir, sorted({r["dataset"] for r in rows}), log=lambda *_: None):
        cases = {c.name: c for c in dataset_cases(dataset)}
        foreground = foreground_mask(dataset.reference)
        for row in rows:
            if row["dataset"] != dataset.name or row["case"] not in cases:
                continue
            image_kspace, calibration = undersample(cases[row["case"]], dataset.kspace)
            with BartCase(image_kspace, calibration, cache) as case:
                image, ecalib_s, pics_s, _ = case.reconstruct("l2", FIXED["maps"], FIXED["crop"], FIXED["lambda"])
            out[(row["dataset"], row["case"])] = {"metrics": all_metrics(dataset.reference, image, foreground),
                                                  "seconds": ecalib_s + pics_s}
    return out


def table(results: dict, fixed: dict) -> str:
    rows = results["rows"]
    l1 = any("sense_l1" in r["metrics"] for r in rows)
    head = ["dataset", "case", "R", "zero-filled", "BART l2 tuned", "BART l2 fixed", "sense", "sense - tuned",
            "sense - fixed", "grappa", "grappa - tuned", "seconds: BART tuned / fixed / sense / grappa"]
    if l1:
        head += ["BART l1 tuned", "sense_l1", "sense_l1 - l1 tuned", "seconds: BART l1 / sense_l1"]
    chosen = any("classical" in r["metrics"] for r in rows)
    if chosen:
        head += ["classical", "classical - tuned", "seconds: classical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    deltas = {"sense_tuned": [], "sense_fixed": [], "grappa_tuned": [], "grappa_fixed": []}
    speed = {"sense": [], "grappa": []}
    l1_deltas, l1_speed = [], []

    def cell(m):
        return f"{m['psnr']:.2f} / {m['ssim']:.3f}"

    for r in rows:
        m, s = r["metrics"], r["seconds"]
        f = fixed.get((r["dataset"], r["case"]))
        if "sense" not in m or "bart_sense_l2" not in m or f is None:
            continue
        tuned = m["bart_sense_l2"]["psnr"]
        d_st, d_sf = m["sense"]["psnr"] - tuned, m["sense"]["psnr"] - f["metrics"]["psnr"]
        d_gt, d_gf = m["grappa"]["psnr"] - tuned, m["grappa"]["psnr"] - f["metrics"]["psnr"]
        for key, value in zip(deltas, (d_st, d_sf, d_gt, d_gf)):
            deltas[key].append(value)
        speed["sense"].append(s["sense"] / s["bart_sense_l2"])
        speed["grappa"].append(s["grappa"] / s["bart_sense_l2"])
        line = (f"| {r['dataset']} | {r['case']} | {r['R_achieved']:.2f} | {cell(m['zero_filled'])} "
                f"| {cell(m['bart_sense_l2'])} | {cell(f['metrics'])} | {cell(m['sense'])} | {d_st:+.2f} "
                f"| {d_sf:+.2f} | {cell(m['grappa'])} | {d_gt:+.2f} "
                f"| {s['bart_sense_l2']:.2f} / {f['seconds']:.2f} / {s['sense']:.2f} / {s['grappa']:.2f} |")
        if l1 and "sense_l1" in m and "bart_l1_espirit" in m:
            d_l1 = m["sense_l1"]["psnr"] - m["bart_l1_espirit"]["psnr"]
            l1_deltas.append(d_l1)
            l1_speed.append(s["sense_l1"] / s["bart_l1_espirit"])
            line += (f" {cell(m['bart_l1_espirit'])} | {cell(m['sense_l1'])} | {d_l1:+.2f} "
                     f"| {s['bart_l1_espirit']:.2f} / {s['sense_l1']:.2f} |")
        if chosen and "classical" in m:
            line += f" {cell(m['classical'])} | {m['classical']['psnr'] - tuned:+.2f} | {s['classical']:.2f} |"
        lines.append(line)
    n = len(deltas["sense_tuned"])
    lines += ["", *layout_summary(rows)]
    if n:
        lines += ["", f"{n} cases. PSNR difference (dB), mean / min / cases within 0.5 dB or better:", ""]
        for key, values in deltas.items():
            values = np.asarray(values)
            lines.append(f"- {key.replace('_', ' vs BART l2 ')}: {values.mean():+.2f} / {values.min():+.2f} / "
                         f"{int(np.sum(values >= -0.5))} of {n}")
        if l1_deltas:
            values = np.asarray(l1_deltas)
            lines.append(f"- sense_l1 vs BART l1-ESPIRiT tuned: {values.mean():+.2f} / {values.min():+.2f} / "
                         f"{int(np.sum(values >= -0.5))} of {len(values)}")
            lines.append(f"- sense_l1 time / BART l1 tuned time: median {np.median(l1_speed):.2f}, "
                         f"max {np.max(l1_speed):.2f}")
        for method, ratios in speed.items():
            lines.append(f"- {method} time / BART l2 tuned (ecalib + pics) time: median {np.median(ratios):.2f}, "
                         f"max {np.max(ratios):.2f}")
    return "\n".join(lines) + "\n"


STUDY_GRID = tuple(float(v) for v in 10 ** np.arange(-4.0, 0.01, 0.25))


def lambda_study(datasets: list, log=print) -> str:
    """Markdown table: per case the sense core's PSNR at the oracle lambda (best of STUDY_GRID by
    PSNR against the reference), at the automatic lambda and at the fixed default."""
    import time
    from gadgets.classical import (FIXED_SENSE_LAMBDA, SENSE_CALIBRATION_REGION, DEFAULT_VIRTUAL_COILS, espirit_crop,
                                   sense_lambda)
    from gadgets.numerics.calibration import compressed_calibration, sense_calibration_options
    from gadgets.numerics.coils import compress
    from gadgets.numerics.fft import ifftc
    from gadgets.numerics.reference import centre_region
    from gadgets.numerics.sense import sense_tikhonov
    from gadgets.slices import SliceData
    from tools.evaluation.datasets import dataset_cases, sampled_lines, undersample
    from tools.evaluation.metrics import psnr, scale_match

    lines = ["| dataset | case | oracle lambda | oracle PSNR | auto lambda (rule) | auto - oracle | "
             "fixed 0.01 - oracle | auto choice s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    auto_d, fixed_d = [], []
    for dataset in datasets:
        for case in dataset_cases(dataset):
            image_kspace, calibration = undersample(case, dataset.kspace)
            data = SliceData(image_kspace, case.mask.astype(np.float32), calibration, sampled_lines(calibration))
            block, count, _ = data.reference_block()
            matrix, maps, eigenvalues = compressed_calibration(
                centre_region(block, *SENSE_CALIBRATION_REGION), image_kspace.shape[1:], DEFAULT_VIRTUAL_COILS,
                **sense_calibration_options(count))
            maps, _ = espirit_crop(maps, eigenvalues, data.acceleration, "auto")    # the maps the sense core uses
            hybrid = ifftc(compress(image_kspace, matrix), axes=(-1,))

            def score(lam):
                image = sense_tikhonov(hybrid, data.mask, maps, lam=lam, per_map=True)
                image = np.sqrt(np.sum(np.abs(image) ** 2, axis=0)) if image.ndim == 3 else np.abs(image)
                return psnr(dataset.reference, scale_match(image, dataset.reference))

            scores = {lam: score(lam) for lam in STUDY_GRID}
            oracle = max(scores, key=scores.get)
            started = time.perf_counter()
            lam, rule = sense_lambda(hybrid, data.mask, maps, "auto")
            seconds = time.perf_counter() - started
            auto, fixed = score(lam) - scores[oracle], score(FIXED_SENSE_LAMBDA) - scores[oracle]
            auto_d.append(auto)
            fixed_d.append(fixed)
            lines.append(f"| {dataset.name} | {case.name} | {oracle:.3g} | {scores[oracle]:.2f} | {lam:.3g} {rule} "
                         f"| {auto:+.2f} | {fixed:+.2f} | {seconds:.2f} |")
            log(lines[-1], flush=True)
    auto_d, fixed_d = np.asarray(auto_d), np.asarray(fixed_d)
    lines += ["", f"{auto_d.size} cases, PSNR difference to the per-case oracle (dB), mean / min / within 0.5 dB:",
              f"- automatic: {auto_d.mean():+.2f} / {auto_d.min():+.2f} / {int(np.sum(auto_d >= -0.5))}",
              f"- fixed 0.01: {fixed_d.mean():+.2f} / {fixed_d.min():+.2f} / {int(np.sum(fixed_d >= -0.5))}"]
    return "\n".join(lines) + "\n"


SUMMARY_METHODS = (("bart_sense_l2", "BART l2 tuned"), ("bart_l1_espirit", "BART l1 tuned"), ("classical", "classical"),
                   ("sense", "sense"), ("grappa", "grappa"), ("sense_l1", "sense_l1"))


def layout_summary(rows: list[dict]) -> list[str]:
    """Mean PSNR per dataset and layout of every method present, and the issue-18 targets: the
    classical chain against tuned BART SENSE-l2, sense_l1 against tuned BART l1-ESPIRiT."""
    present = [(key, label) for key, label in SUMMARY_METHODS if any(key in r["metrics"] for r in rows)]
    out = ["| dataset | layout | cases | " + " | ".join(label for _, label in present) + " |",
           "|---|---|---:|" + "---:|" * len(present)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r.get("layout", "-")), []).append(r)
    for (dataset, layout), group in groups.items():
        cells = []
        for key, _ in present:
            values = [r["metrics"][key]["psnr"] for r in group if key in r["metrics"]]
            cells.append(f"{np.mean(values):.2f}" if values else "-")
        out.append(f"| {dataset} | {layout} | {len(group)} | " + " | ".join(cells) + " |")
    out.append("")
    for ours, anchor, floor in (("classical", "bart_sense_l2", -1.5), ("sense", "bart_sense_l2", -1.5),
                                ("grappa", "bart_sense_l2", -1.5), ("sense_l1", "bart_l1_espirit", -2.0)):
        pairs = [(r["metrics"][ours]["psnr"] - r["metrics"][anchor]["psnr"], r) for r in rows
                 if ours in r["metrics"] and anchor in r["metrics"]]
        if not pairs:
            continue
        values = np.asarray([d for d, _ in pairs])
        worst = min(pairs, key=lambda p: p[0])[1]
        out.append(f"- {ours} - {anchor}: mean {values.mean():+.2f} dB, min {values.min():+.2f} "
                   f"({worst['dataset']} {worst['case']}), cases below {floor:g} dB: {int(np.sum(values < floor))} "
                   f"of {values.size}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tools.evaluation.datasets import DEFAULT_DATA
    parser.add_argument("run", nargs="?", type=Path, default=Path("runs/eval_classical"),
                        help="a `pisf evaluate` output folder with the classical methods (results.json)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the real data")
    parser.add_argument("--bart-cache", default="runs/bart_cache", help="BART result cache ('' for none)")
    parser.add_argument("--lambda-study", type=Path, default=None, metavar="OUT",
                        help="instead: the sense lambda study (oracle / automatic / fixed per case) into OUT")
    parser.add_argument("--datasets", nargs="+", default=None, help="datasets of the lambda study (default: the 39 cases')")


def run(args: argparse.Namespace) -> int:
    if args.lambda_study is not None:
        from tools.cli import created_directory
        from tools.evaluation.datasets import load_datasets
        text = lambda_study(load_datasets(args.data, args.datasets))
        created_directory(args.lambda_study)
        (args.lambda_study / "lambda_study.md").write_text(text)
        print(text)
        return 0
    results = json.loads((args.run / "results.json").read_text())
    fixed = fixed_bart(results["rows"], args.data, args.bart_cache or None)
    text = table(results, fixed)
    (args.run / "classical_table.md").write_text(text)
    print(text)
    return 0

"""What a physicist looks at after a replay: metrics, side-by-side figures, a quality/latency plot, cine GIFs.

`pisf replay` and `pisf demo` call write_report() with the images of each chain (and a locally
computed zero-filled recon), plus the ground truth when the raw file carries one
(tools/rawdata/groundtruth.py). Written into one directory:

    metrics.json, metrics.csv   one row per series and image (every slice, phase, repetition,
                                contrast, set): PSNR, SSIM, NMSE, latency, the image's method
    compare_slice000.png        per slice (its first phase/repetition; the partition shown, for 3D):
                                reference | each series, windowed as a console would
                                (the image's WindowCenter/WindowWidth), and below each its
                                error map |recon - reference| on one colour scale (% of the
                                reference maximum, colour bar), PSNR/SSIM in the titles
    quality_latency.png         PSNR, SSIM and latency per image for every series
    cine_slice000.gif           multi-phase (cine) scans: the same panels through the phases

A chain that sends one series is labelled by its name; one that sends several (pisf_compare: PISF
and GRAPPA) has each series labelled by the method its images carry (PISF_Method meta): "pisf",
"grappa", or "pisf (pisf_compare)" where several chains share a report. Writing a report first
removes the files an earlier report left in the directory, so figures never outlive their metrics.

Metrics are the fastMRI ones (tools/evaluation/metrics.py) after a least-squares scale match of each image
to the reference. matplotlib is imported here only, never by the server runtime.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tools.rawdata.groundtruth import GroundTruth


class ImageKey(NamedTuple):
    """Which image of the scan: every index a chain keeps images apart by (client.SliceKey's)."""
    slice: int
    phase: int = 0
    repetition: int = 0
    contrast: int = 0
    set: int = 0
    copy: int = 0   # the n-th image a series sent with the same indices (0 but for odd chains): none is dropped

    @classmethod
    def of(cls, image) -> "ImageKey":
        return cls(int(image.slice), int(image.phase), int(image.repetition), int(image.contrast), int(image.set))


KEY_FIELDS = ImageKey._fields
# Report files write_report() owns in its directory (removed before a new report is written).
REPORT_PATTERNS = ("metrics.json", "metrics.csv", "compare_slice*.png", "cine_slice*.gif", "quality_latency.png")


@dataclass
class Panel:
    """One displayed image: a 2D magnitude plane, its display window and its latency; `method` from the
    image's PISF_Method meta; `partition` (shown, of count) for a 3D image, whose middle partition is shown."""
    data: np.ndarray
    window: tuple[float, float]
    latency_ms: float | None = None
    method: str = ""
    partition: tuple[int, int] | None = None


@dataclass
class Report:
    directory: Path
    rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- images -> panels

def image_plane(image) -> np.ndarray:
    """The displayed plane of an ismrmrd.Image (first channel, middle z) as float64 [y, x]."""
    data = np.asarray(image.data)
    plane = data[0, data.shape[1] // 2]
    return np.abs(plane).astype(np.float64) if np.iscomplexobj(plane) else plane.astype(np.float64)


def shown_partition(image) -> tuple[int, int] | None:
    """(index, count) of the partition image_plane shows for a 3D image; None for 2D."""
    partitions = np.asarray(image.data).shape[1]
    return (partitions // 2, partitions) if partitions > 1 else None


def image_method(image) -> str:
    """The recon method the image says made it (PISF_Method meta, lower case), '' when it does not say."""
    try:
        return str(image.meta["PISF_Method"]).lower()
    except (KeyError, TypeError, ValueError):
        return ""


def console_window(image) -> tuple[float, float]:
    """(low, high) as the console windows it: WindowCenter/WindowWidth meta, else percentiles."""
    try:
        centre, width = float(image.meta["WindowCenter"]), float(image.meta["WindowWidth"])
        if width > 0:
            return centre - width / 2, centre + width / 2
    except (KeyError, ValueError, TypeError):
        pass
    return percentile_window(image_plane(image))


def percentile_window(plane: np.ndarray) -> tuple[float, float]:
    """The rule image_finish uses for its meta window: 1st to 99.5th percentile."""
    low, high = np.percentile(plane, [1.0, 99.5])
    return float(low), float(max(high, low + 1e-6))


def series_labels(received, label: str, qualify: bool = False) -> dict[int, str]:
    """series index -> its label: `label` when the chain sent one series; otherwise the method most
    of the series' images carry ("pisf", "grappa"), as "method (label)" when `qualify` (several chains in
    one report), "series N" when its images name no method; a repeated name gets its series number."""
    methods: dict[int, Counter] = {}
    for r in received:
        methods.setdefault(int(r.image.image_series_index), Counter())[image_method(r.image)] += 1
    if len(methods) == 1:
        return {series: label for series in methods}
    names = {}
    for series, counts in sorted(methods.items()):
        method = counts.most_common(1)[0][0] or f"series {series}"
        names[series] = f"{method} ({label})" if qualify else method
    repeated = Counter(names.values())
    return {series: (f"{name} series {series}" if repeated[name] > 1 else name) for series, name in names.items()}


def panels_from_images(received, label: str, qualify: bool = False) -> dict[str, dict[ImageKey, Panel]]:
    """series label -> {ImageKey: Panel} from ReceivedImage objects (labels: series_labels).
    Every image has its own key, so every image gets its row."""
    labels = series_labels(received, label, qualify)
    panels: dict[str, dict[ImageKey, Panel]] = {}
    for r in received:
        image = r.image
        images = panels.setdefault(labels[int(image.image_series_index)], {})
        key = ImageKey.of(image)
        while key in images:
            key = key._replace(copy=key.copy + 1)
        latency = r.latency_s * 1e3 if r.latency_s is not None else None
        images[key] = Panel(image_plane(image), console_window(image), latency, image_method(image),
                            shown_partition(image))
    return panels


# ---------------------------------------------------------------- metrics

def compute_rows(panels: dict[str, dict[ImageKey, Panel]], reference: GroundTruth | None) -> tuple[list[dict], list[str]]:
    """One row per (label, image): PSNR/SSIM/NMSE against the reference of its slice and phase (None
    without one; every repetition, contrast and set of a slice and phase has the same reference)."""
    from tools.evaluation.metrics import nmse, psnr, scale_match, ssim

    rows, notes = [], []
    for label, images in panels.items():
        for key, panel in sorted(images.items()):
            row = dict(chain=label, method=panel.method, **key._asdict(), psnr_db=None, ssim=None, nmse=None,
                       latency_ms=None if panel.latency_ms is None else round(panel.latency_ms, 1))
            truth = reference.image(key.slice, key.phase) if reference is not None else None
            if truth is not None and truth.shape == panel.data.shape and truth.max() > 0:
                matched = scale_match(panel.data, truth)
                row.update(psnr_db=round(psnr(truth, matched), 3), ssim=round(ssim(truth, matched), 4),
                           nmse=round(nmse(truth, matched), 6))
            elif truth is not None:
                notes.append(f"{label} {_key_text(key)}: image {panel.data.shape} and reference "
                             f"{truth.shape} differ in size; no metrics")
            rows.append(row)
    return rows, notes


def _key_text(key: ImageKey) -> str:
    """'slice 2 phase 0 repetition 3': slice and phase always, the other indices where not 0."""
    return " ".join(f"{name} {value}" for name, value in key._asdict().items()
                    if name in ("slice", "phase") or value)


def _varying_key_fields(rows: list[dict]) -> list[str]:
    """slice, phase, and each other index that is not 0 in some row (the table's columns)."""
    return [name for name in KEY_FIELDS if name in ("slice", "phase") or any(r[name] for r in rows)]


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per label: images, mean PSNR/SSIM (where measured), latency p50/p95/max."""
    out = {}
    for label in dict.fromkeys(r["chain"] for r in rows):
        mine = [r for r in rows if r["chain"] == label]
        psnrs = [r["psnr_db"] for r in mine if r["psnr_db"] is not None]
        ssims = [r["ssim"] for r in mine if r["ssim"] is not None]
        latencies = [r["latency_ms"] for r in mine if r["latency_ms"] is not None]
        out[label] = dict(
            images=len(mine),
            mean_psnr_db=round(float(np.mean(psnrs)), 3) if psnrs else None,
            mean_ssim=round(float(np.mean(ssims)), 4) if ssims else None,
            latency_p50_ms=round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            latency_p95_ms=round(float(np.percentile(latencies, 95)), 1) if latencies else None,
            latency_max_ms=round(float(np.max(latencies)), 1) if latencies else None)
    return out


def format_table(rows: list[dict]) -> str:
    """The console table: one line per image, then one summary line per label; the label column is
    as wide as the longest label, index columns appear where they vary."""
    width = max([len("chain")] + [len(r["chain"]) for r in rows])
    indices = _varying_key_fields(rows)
    lines = [f" {'chain':<{width}} " + " ".join(f"{name:>{max(len(name), 5)}}" for name in indices)
             + "   PSNR dB    SSIM      NMSE   latency ms"]

    def show(value, fmt):
        return format(value, fmt) if value is not None else "-".rjust(len(format(0.0, fmt)))

    for r in rows:
        lines.append(f" {r['chain']:<{width}} " + " ".join(f"{r[name]:>{max(len(name), 5)}d}" for name in indices)
                     + f" {show(r['psnr_db'], '9.2f')} {show(r['ssim'], '7.4f')} {show(r['nmse'], '9.5f')} "
                       f"{show(r['latency_ms'], '12.1f')}")
    for label, s in summary(rows).items():
        quality = (f"mean PSNR {s['mean_psnr_db']:.2f} dB, mean SSIM {s['mean_ssim']:.4f}"
                   if s["mean_psnr_db"] is not None else "no ground truth: no PSNR/SSIM")
        latency = (f"latency p50 {s['latency_p50_ms']:.1f} / p95 {s['latency_p95_ms']:.1f} / max "
                   f"{s['latency_max_ms']:.1f} ms" if s["latency_p50_ms"] is not None else "latency not measured")
        lines.append(f" {label}: {s['images']} images, {quality}; {latency}")
    return "\n".join(lines)


def write_metrics(directory: Path, rows: list[dict], title: str) -> list[Path]:
    json_path, csv_path = directory / "metrics.json", directory / "metrics.csv"
    json_path.write_text(json.dumps(dict(title=title, metric_note=(
        "PSNR/SSIM/NMSE (fastMRI definitions, data range = reference max) after a least-squares "
        "scale match of each image to the ground-truth RSS; latency = last line sent -> image received; "
        "chain = the series' label, method = what the image says made it (PISF_Method)"),
        summary=summary(rows), rows=rows), indent=2))
    fields = (["chain", "method", *[name for name in KEY_FIELDS if name != "copy"]]
              + (["copy"] if any(r["copy"] for r in rows) else []) + ["psnr_db", "ssim", "nmse", "latency_ms"])
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in fields})
    return [json_path, csv_path]


# ---------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nice_ceiling(value: float) -> float:
    """1, 2 or 5 times a power of ten, >= value (colour-bar limits people can read)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * 10 ** exponent >= value:
            return step * 10 ** exponent
    return 10 ** (exponent + 1)


def _error_maps(panels, key, truth) -> tuple[dict[str, np.ndarray], float]:
    """label -> |scale-matched recon - reference| in % of the reference max; one common scale."""
    from tools.evaluation.metrics import scale_match

    maps = {}
    for label, images in panels.items():
        panel = images.get(key)
        if panel is None or truth is None or panel.data.shape != truth.shape or truth.max() <= 0:
            continue
        maps[label] = np.abs(scale_match(panel.data, truth) - truth) / truth.max() * 100.0
    if not maps:
        return maps, 1.0
    # One scale for all chains: the median of their 99th percentiles, so the better chains'
    # errors stay visible; larger errors saturate (said in the figure).
    scale = _nice_ceiling(float(np.median([np.percentile(m, 99.0) for m in maps.values()])))
    return maps, scale


def compare_figure(path: Path, panels, key, truth: np.ndarray | None, rows_by_key: dict, title: str) -> None:
    plt = _pyplot()
    labels = list(panels)
    columns = (["reference"] if truth is not None else []) + labels
    maps, scale = _error_maps(panels, key, truth)
    nrows = 2 if maps else 1
    fig, axes = plt.subplots(nrows, len(columns), figsize=(3.1 * len(columns), 3.4 * nrows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for column, name in enumerate(columns):
        ax = axes[0, column]
        if name == "reference":
            low, high = percentile_window(truth)
            ax.imshow(truth, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.set_title("reference (ground truth)", fontsize=9)
            continue
        panel = panels[name].get(key)
        if panel is None:
            ax.set_title(f"{name}: no image", fontsize=9)
            continue
        low, high = panel.window
        ax.imshow(panel.data, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        row = rows_by_key.get((name, key))
        subtitle = (f"\nPSNR {row['psnr_db']:.2f} dB  SSIM {row['ssim']:.3f}"
                    if row is not None and row["psnr_db"] is not None else "")
        latency = f"  {panel.latency_ms:.0f} ms" if panel.latency_ms is not None else ""
        partition = (f"\npartition {panel.partition[0]} of {panel.partition[1]}"
                     if panel.partition is not None else "")
        ax.set_title(f"{name}{latency}{subtitle}{partition}", fontsize=9)
        if nrows == 2 and name in maps:
            error_ax = axes[1, column]
            shown = error_ax.imshow(maps[name], cmap="inferno", vmin=0.0, vmax=scale, interpolation="nearest")
            error_ax.set_title(f"|{name} - reference|", fontsize=9)
            bar = fig.colorbar(shown, ax=error_ax, fraction=0.046, pad=0.02)
            bar.set_label("% of reference max", fontsize=8)
            bar.ax.tick_params(labelsize=7)
    if nrows == 2 and truth is not None:
        axes[1, 0].text(0.5, 0.5, f"error maps after a least-\nsquares scale match:\none colour scale,\n"
                                  f"0 .. {scale:g} % of the\nreference maximum\n(larger errors saturate)",
                        ha="center", va="center", fontsize=9, transform=axes[1, 0].transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# One marker and line style per series, so that series with the same values (pisf and
# "pisf (pisf_compare)") show as two marks instead of one hiding the other.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
_LINESTYLES = ("-", "--", ":", "-.")
_MIN_SPAN = {"psnr_db": 2.0, "ssim": 0.05}   # the least y range a quality axis shows


def _tick_label(key: ImageKey, fields: list[str]) -> str:
    short = dict(slice="s", phase="p", repetition="r", contrast="c", set="set", copy="#")
    return "".join(f"{short[name]}{getattr(key, name)}" for name in fields)


def quality_latency_figure(path: Path, rows: list[dict], title: str) -> None:
    plt = _pyplot()
    has_quality = any(r["psnr_db"] is not None for r in rows)
    has_latency = any(r["latency_ms"] is not None for r in rows)
    metrics = ([("psnr_db", "PSNR (dB)"), ("ssim", "SSIM")] if has_quality else []) + \
        ([("latency_ms", "latency (ms)")] if has_latency else [])
    if not metrics:
        return
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.4 * len(metrics) + 0.6), sharex=True, squeeze=False)
    keys = sorted({ImageKey(**{name: r[name] for name in KEY_FIELDS}) for r in rows})
    position = {key: i for i, key in enumerate(keys)}
    labels = list(dict.fromkeys(r["chain"] for r in rows))
    for ax, (name, label) in zip(axes[:, 0], metrics):
        for n, chain in enumerate(labels):
            mine = [r for r in rows if r["chain"] == chain and r[name] is not None]
            if mine:
                ax.plot([position[ImageKey(**{f: r[f] for f in KEY_FIELDS})] for r in mine], [r[name] for r in mine],
                        marker=_MARKERS[n % len(_MARKERS)], linestyle=_LINESTYLES[n % len(_LINESTYLES)],
                        label=chain, markersize=7 - 0.5 * (n % 6), fillstyle="none" if n % 2 else "full", alpha=0.85)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        low, high = ax.get_ylim()
        span = _MIN_SPAN.get(name, 0.0)
        if high - low < span:   # nearly equal values (repetitions): no axis of 0.001 dB steps
            ax.set_ylim((low + high - span) / 2, (low + high + span) / 2)
    axes[0, 0].legend(fontsize=8, loc="best")
    shown = [name for name in _varying_key_fields(rows) if name == "slice" or len({r[name] for r in rows}) > 1]
    ticks = [_tick_label(key, shown) for key in keys]
    step = max(1, len(ticks) // 24)
    axes[-1, 0].set_xticks(range(0, len(ticks), step))
    axes[-1, 0].set_xticklabels(ticks[::step], fontsize=8, rotation=45 if len(ticks) > 12 else 0)
    axes[-1, 0].set_xlabel("image (" + ", ".join(shown) + ")")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _to_uint8(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return (np.clip((plane - low) / max(high - low, 1e-12), 0, 1) * 255).astype(np.uint8)


def cine_gif(path: Path, panels, first: ImageKey, phases: list[int], truth_of, frame_ms: int = 100) -> None:
    """Animated GIF through the cine phases of `first`'s slice (and repetition, contrast, set):
    reference (if any) and each series side by side."""
    from PIL import Image, ImageDraw

    frames = []
    slice_index = first.slice
    for phase in phases:
        tiles, names = [], []
        truth = truth_of(phase)
        if truth is not None:
            tiles.append(_to_uint8(truth, percentile_window(truth)))
            names.append("reference")
        for label, images in panels.items():
            panel = images.get(first._replace(phase=phase))
            if panel is not None:
                tiles.append(_to_uint8(panel.data, panel.window))
                names.append(label)
        if not tiles:
            continue
        zoom = max(1, math.ceil(192 / max(t.shape[0] for t in tiles)))  # room for the labels
        tiles = [np.kron(t, np.ones((zoom, zoom), np.uint8)) for t in tiles]
        height = max(t.shape[0] for t in tiles)
        padded = [np.pad(t, ((0, height - t.shape[0]), (0, 4))) for t in tiles]
        frame = Image.fromarray(np.concatenate(padded, axis=1)).convert("RGB")
        draw = ImageDraw.Draw(frame)
        x = 0
        for tile, name in zip(tiles, names):
            draw.text((x + 3, 3), name, fill=(255, 220, 0))
            x += tile.shape[1] + 4
        draw.text((3, height - 13), f"slice {slice_index} phase {phase}", fill=(255, 220, 0))
        frames.append(frame)
    if frames:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


# ---------------------------------------------------------------- the report

def remove_earlier_report(directory: Path) -> list[Path]:
    """Remove the files an earlier write_report() left in `directory` (REPORT_PATTERNS only)."""
    removed = [path for pattern in REPORT_PATTERNS for path in sorted(directory.glob(pattern)) if path.is_file()]
    for path in removed:
        path.unlink()
    return removed


def write_report(directory: Path | str, panels: dict[str, dict[ImageKey, Panel]],
                 reference: GroundTruth | None, title: str) -> Report:
    """Write metrics (every image), per-slice comparison PNGs, the quality/latency plot and cine GIFs,
    after removing an earlier report's files from the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = Report(directory)
    removed = remove_earlier_report(directory)
    if removed:
        report.notes.append(f"removed {len(removed)} files of an earlier report in {directory}")
    rows, notes = compute_rows(panels, reference)
    report.rows, report.notes = rows, report.notes + notes
    report.files += write_metrics(directory, report.rows, title)
    rows_by_key = {(r["chain"], ImageKey(**{name: r[name] for name in KEY_FIELDS})): r for r in report.rows}
    keys = sorted({key for images in panels.values() for key in images})
    for slice_index in sorted({key.slice for key in keys}):
        first = min(key for key in keys if key.slice == slice_index)
        phases = sorted({key.phase for key in keys if key[:1] + key[2:] == first[:1] + first[2:]})
        truth = reference.image(first.slice, first.phase) if reference is not None else None
        path = directory / f"compare_slice{slice_index:03d}.png"
        others = [key for key in keys if key.slice == slice_index]
        shown = ", ".join(f"{name} {value}" for name, value in first._asdict().items()
                          if name != "slice" and (value or len({getattr(k, name) for k in others}) > 1))
        partitions = [p.partition for images in panels.values() for k, p in images.items() if k == first and p.partition]
        shown_3d = (f", partition {partitions[0][0]} of {partitions[0][1]} (the middle one, counted from 0)"
                    if partitions else "")
        compare_figure(path, panels, first, truth, rows_by_key,
                       f"{title}: slice {slice_index}" + (f", {shown}" if shown else "") + shown_3d)
        report.files.append(path)
        if len(phases) > 1:
            gif = directory / f"cine_slice{slice_index:03d}.gif"
            cine_gif(gif, panels, first, phases,
                     lambda phase: reference.image(slice_index, phase) if reference is not None else None)
            if gif.exists():
                report.files.append(gif)
    plot = directory / "quality_latency.png"
    quality_latency_figure(plot, report.rows, title)
    if plot.exists():
        report.files.append(plot)
    return report

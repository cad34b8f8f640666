"""`pisf bench`: latency, throughput and memory of the inline server, with BART beside it.

Starts `pisf serve` as its own process on a free loopback port, replays raw data through it
for each chain (a simulated multi-slice dataset, plus the shared Siemens file when present)
and reports per chain and dataset:

- per-slice latency p50/p95, server side (image meta PISF_LatencyMs: last line received ->
  image finished, queueing included) and client side (last line sent -> image received);
- throughput: images / (first line sent -> last image received), lines streamed unpaced;
- peak server RSS (VmRSS from /proc/PID/status, sampled while the replay runs);
- onnxruntime provider (image meta PISF_Provider), CPU model and core count.

Also: BART l1-ESPIRiT and SENSE-l2 (ecalib + pics, OMP_NUM_THREADS=1) on slices of every
replayed dataset, with the grappa and sense chains' cores timed on the very same slices
(`--chains zerofill pisf grappa sense pisf_compare` replays those chains too); `--realtime`: lines paced by their time stamps, latency over the scan (flat or
growing?) and the real-time factor; `--soak N`: N slices replayed back to back with the
server RSS sampled after each replay; `--connections N ...`: N clients replaying the simulated
scan at once (peak server RSS, latency, every image against one connection's, and the RSS
before the load and `--after-idle S` seconds after it: is the memory handed back?). Writes
bench.md, bench.json and bench.png (the plot needs matplotlib: `pip install -e .[bench]`;
skipped with a message without it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tools.session.server_process import start_server, stop_server
REPO = Path(__file__).resolve().parents[2]
SHARED_RAW = REPO.parent / "shared" / "data" / "siemens_skyra_R3_14ch.h5"
TICK_S = 2.5e-3  # acquisition_time_stamp unit


# ----------------------------------------------------------------------------- process memory
def rss_bytes(pid: int, field: str = "VmRSS") -> int | None:
    """VmRSS (or VmHWM, the peak) of a process from /proc, in bytes; None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def process_counts(pid: int) -> dict:
    """Open file descriptors (/proc/PID/fd) and threads (/proc/PID/status Threads) of a process."""
    counts: dict = {"fds": None, "threads": None}
    try:
        counts["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    counts["threads"] = int(line.split()[1])
    except OSError:
        pass
    return counts


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every `interval_s` until stopped; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = rss_bytes(pid) or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            value = rss_bytes(self.pid)
            if value is not None:
                self.peak = max(self.peak, value)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        value = rss_bytes(self.pid)
        if value is not None:
            self.peak = max(self.peak, value)
        return self.peak


def hardware() -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": model or platform.processor() or "unknown", "cpu_cores": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            # The server inherits these; BLAS threading matters for its per-line matrix products.
            "thread_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                           if os.environ.get(k) is not None}}
    try:
        import onnxruntime as ort
        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers_available"] = ort.get_available_providers()
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------- statistics
def percentiles(values) -> dict:
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "p50": None, "p95": None, "max": None, "mean": None}
    return {"n": int(values.size), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max()), "mean": float(values.mean())}


def _meta_float(image, name: str) -> float | None:
    try:
        return float(image.meta[name])
    except (KeyError, ValueError, TypeError):
        return None


def _meta_str(image, name: str) -> str | None:
    try:
        return str(image.meta[name])
    except (KeyError, TypeError):
        return None


def trend(values: list[float], window: int = 10) -> dict:
    """Is latency flat over the scan? Slope (ms per slice) and first-vs-last window p50."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n < 2:
        return {"slope_ms_per_slice": None, "first_p50_ms": None, "last_p50_ms": None, "flat": None}
    w = max(1, min(window, n // 2))
    slope = float(np.polyfit(np.arange(n), np.asarray(values), 1)[0])
    first, last = float(np.median(values[:w])), float(np.median(values[-w:]))
    # Flat: the end of the scan is not more than 20 % (+5 ms of jitter) slower than its start.
    return {"slope_ms_per_slice": slope, "window": w, "first_p50_ms": first, "last_p50_ms": last,
            "flat": bool(last <= 1.2 * first + 5.0)}


# ----------------------------------------------------------------------------- server
def chain_config_text(chain: str, model: str | None) -> str | None:
    """CONFIG_TEXT for `chain` with the PISF model replaced, or None (send the name)."""
    if model is None or chain != "pisf":
        return None
    import yaml

    path = REPO / "config" / f"{chain}.yaml"
    mapping = yaml.safe_load(path.read_text())
    replaced = False
    for stage in mapping["stages"]:
        if stage.get("gadget") == "pisf_recon":
            stage["model"] = str(Path(model).resolve())
            replaced = True
    if not replaced:
        raise ValueError(f"chain {chain} has no pisf_recon stage to point at {model}")
    return yaml.safe_dump(mapping, sort_keys=False)


# ----------------------------------------------------------------------------- replays
def warm_up_subset(acquisitions: list, slices: int = 2) -> list:
    """The stream up to and including the `slices`-th LAST_IN_SLICE line (the whole stream
    when it has fewer), so a warm-up replay sees the same shapes as the measured one."""
    import ismrmrd

    seen = 0
    for n, acquisition in enumerate(acquisitions):
        if acquisition.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            seen += 1
            if seen == slices:
                return acquisitions[:n + 1]
    return acquisitions


def timed_replay(port: int, pid: int, header: str, acquisitions: list, chain: str, config_text: str | None,
                 realtime: bool = False, timeout_s: float = 600.0) -> dict:
    """One replay with wall time and peak server RSS; the images and failures it brought."""
    from gadgets.wire.client import replay

    sampler = RssSampler(pid)
    sampler.start()
    started = time.monotonic()
    result = replay(None, "127.0.0.1", port, chain, config_text=config_text, realtime=realtime,
                    timeout_s=timeout_s, header_text=header, acquisitions=acquisitions)
    wall = time.monotonic() - started
    peak = sampler.stop()
    failure = None
    if result.error or result.errors or not result.closed:
        failure = "; ".join(result.errors) or result.error or "no CLOSE from the server"
    return {"result": result, "wall_s": wall, "peak_rss": peak, "failure": failure}


def image_rows(result) -> list[dict]:
    rows = []
    for order, received in enumerate(result.images):
        image = received.image
        rows.append({"order": order, "slice": int(image.slice), "phase": int(image.phase),
                     "repetition": int(image.repetition),
                     "server_ms": _meta_float(image, "PISF_LatencyMs"),
                     "client_ms": received.latency_s * 1e3 if received.latency_s is not None else None,
                     "inference_ms": _meta_float(image, "PISF_InferenceMs"),
                     "provider": _meta_str(image, "PISF_Provider")})
    return rows


def summarise(rows: list[dict], wall_s: float, peak_rss: int) -> dict:
    providers = sorted({r["provider"] for r in rows if r["provider"]})
    return {"images": len(rows),
            "server_latency_ms": percentiles(r["server_ms"] for r in rows),
            "client_latency_ms": percentiles(r["client_ms"] for r in rows),
            "inference_ms": percentiles(r["inference_ms"] for r in rows),
            "wall_s": wall_s,
            "slices_per_s": len(rows) / wall_s if wall_s > 0 else None,
            "peak_rss_mib": peak_rss / 2 ** 20,
            "provider": ", ".join(providers) if providers else "n/a (no network)"}


def _image_key(image) -> tuple:
    return (int(image.slice), int(image.phase), int(image.repetition), int(image.contrast),
            int(image.image_series_index))


def scan_seconds(acquisitions: list) -> float:
    """Acquisition time of the stream from its time stamps (first to last line, plus one TR)."""
    stamps = np.array([a.acquisition_time_stamp for a in acquisitions], dtype=np.int64)
    if stamps.size < 2:
        return 0.0
    step = np.median(np.diff(stamps)) if stamps.size > 1 else 0
    return float((stamps.max() - stamps.min() + step) * TICK_S)


# ----------------------------------------------------------------------------- BART
def slices_from_raw(path: Path, wanted: int) -> tuple[list[np.ndarray], int]:
    """K[coils, ny, nx] of the first `wanted` slices of a raw file as the server would see them:
    noise-prewhitened, readout oversampling cropped in image space, every acquired line
    (imaging and ACS) in place; plus the ACS size (number of calibration lines per slice)."""
    import ismrmrd
    from gadgets.context import parse_header
    from gadgets.numerics.fft import fftc, ifftc
    from gadgets.wire.client import read_raw

    header_text, acquisitions = read_raw(path)
    header = parse_header(header_text)
    enc = header.encoding[0]
    nx_enc, ny = enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y
    nx = enc.reconSpace.matrixSize.x
    centre_ky = enc.encodingLimits.kspace_encoding_step_1.center
    noise = [a.data for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    whitener = None
    if noise:
        samples = np.concatenate(noise, axis=1)
        covariance = samples @ samples.conj().T / samples.shape[1]
        whitener = np.linalg.inv(np.linalg.cholesky(covariance)).astype(np.complex64)
    slices: dict[int, np.ndarray] = {}
    acs: dict[int, set] = {}
    for a in acquisitions:
        if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            continue
        s = a.idx.slice
        if s not in slices:
            if len(slices) == wanted:
                continue
            slices[s] = np.zeros((a.active_channels, ny, nx_enc), np.complex64)
            acs[s] = set()
        ky = a.idx.kspace_encode_step_1 - centre_ky + ny // 2
        x0 = nx_enc // 2 - a.center_sample
        data = a.data if whitener is None else whitener @ a.data
        slices[s][:, ky, x0:x0 + a.number_of_samples] = data
        if (a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                or a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)):
            acs[s].add(ky)
    start = (nx_enc - nx) // 2
    cropped = [fftc(ifftc(k, axes=(-1,))[..., start:start + nx], axes=(-1,)).astype(np.complex64)
               for k in slices.values()]
    n_acs = min((len(v) for v in acs.values()), default=0)
    return cropped, n_acs


def bart_times(raw: Path, slices: int, work: Path, classical: bool = True) -> dict:
    """Wall time of BART on slices of `raw` (OMP_NUM_THREADS=1): `ecalib` + `pics -l1` (l1-ESPIRiT)
    and `ecalib` + `pics -l2` (SENSE-l2, the sense chain's equivalent); with `classical`, the
    classical chains' cores (gadgets.classical.reconstruct_classical, this process, one BLAS
    thread as set by the caller) on the very same k-space, slice by slice in turn with BART."""
    from tools.evaluation.bart import bart_available, bart_version, run_bart, single_thread_env, write_bart

    if not bart_available():
        return {"skipped": "bart not installed"}
    kspaces, n_acs = slices_from_raw(raw, slices)
    if n_acs < 4:
        return {"skipped": f"only {n_acs} calibration lines: ecalib needs an ACS block"}
    env = single_thread_env()
    if classical:
        from gadgets import limit_blas_threads
        limit_blas_threads()      # as the server runs its stages: one BLAS thread, like BART here
    times, ecalib_times, l2_times = [], [], []
    ours: dict[str, list[float]] = {"sense": [], "sense_l1": [], "grappa": []}
    with tempfile.TemporaryDirectory(prefix="pisf_bench_bart_", dir=work) as tmp:
        tmp = Path(tmp)
        for kspace in kspaces:
            write_bart(tmp / "ksp", kspace)
            ecalib_s = run_bart(["ecalib", "-m1", "-r", n_acs, "-k", "4", "-c", "0.9", tmp / "ksp", tmp / "sens"], env)
            l1_s = run_bart(["pics", "-S", "-l1", "-r", "0.01", tmp / "ksp", tmp / "sens", tmp / "rec"], env)
            l2_s = run_bart(["pics", "-S", "-l2", "-r", "0.01", tmp / "ksp", tmp / "sens", tmp / "rec2"], env)
            ecalib_times.append(ecalib_s * 1e3)
            times.append((ecalib_s + l1_s) * 1e3)
            l2_times.append((ecalib_s + l2_s) * 1e3)
            if classical:
                for method, elapsed in classical_core_ms(kspace).items():
                    ours[method].append(elapsed)
    version = bart_version()
    report = {"slices": len(times), "acs_lines": n_acs, "bart_version": version,
              "shape": list(kspaces[0].shape) if kspaces else None,
              "command": f"ecalib -m1 -r {n_acs} -k 4 -c 0.9; pics -S -l1 -r 0.01; OMP_NUM_THREADS=1",
              "command_l2": f"ecalib -m1 -r {n_acs} -k 4 -c 0.9; pics -S -l2 -r 0.01; OMP_NUM_THREADS=1",
              "ecalib_pics_ms": percentiles(times), "ecalib_pics_l2_ms": percentiles(l2_times),
              "ecalib_ms": percentiles(ecalib_times), "per_slice_ms": times}
    if classical:
        report["classical_core_ms"] = {method: percentiles(values) for method, values in ours.items()}
    return report


def classical_core_ms(kspace: np.ndarray) -> dict[str, float]:
    """Milliseconds of the grappa and sense chains' reconstruction core (sense_l1: the sense chain
    with `regulariser: l1`) on K[coils, ky, kx] with every acquired line as image data and the
    fully sampled centre run as reference (embedded)."""
    from gadgets.classical import ClassicalOptions, reconstruct_classical
    from gadgets.slices import SliceData

    mask = np.any(kspace != 0, axis=(0, 2)).astype(np.float32)
    data = SliceData(kspace, mask)
    out = {}
    for name, method, options in (("sense", "sense", ClassicalOptions()),
                                  ("sense_l1", "sense", ClassicalOptions(sense_regulariser="l1")),
                                  ("grappa", "grappa", ClassicalOptions())):
        started = time.perf_counter()
        reconstruct_classical(data, method, options)
        out[name] = (time.perf_counter() - started) * 1e3
    return out


# ----------------------------------------------------------------------------- report
def _fmt(value, spec=".1f", missing="-") -> str:
    return missing if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """bench.md: the unpaced table, then BART, real time and soak sections when they ran."""
    hw = report["hardware"]
    lines = ["# pisf bench", "",
             f"{report['started']}; CPU: {hw['cpu_model']}, {hw['cpu_cores']} cores "
             f"({hw.get('cpu_affinity')} usable); load average at start {hw['load_average_at_start']}; "
             f"onnxruntime {hw.get('onnxruntime', '?')} ({', '.join(hw.get('onnxruntime_providers_available', []))}); "
             f"thread env {hw.get('thread_env') or 'unset'}",
             "", "Server latency: last line received -> image finished (PISF_LatencyMs). Client latency: last "
             "line sent -> image received. Throughput: images / (first line sent -> last image received), "
             "unpaced. Unpaced latencies include the backlog of lines still queued in the server (the client "
             "sends faster than a scanner); see the real-time section for latency at the scanner's pace. "
             "RSS: server process VmRSS peak during the replays.", "",
             "| dataset | chain | images | server p50 / p95 ms | client p50 / p95 ms | inference p50 ms "
             "| slices/s | peak RSS MiB | provider |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["runs"]:
        if row.get("failure"):
            lines.append(f"| {row['dataset']} | {row['chain']} | FAILED: {row['failure']} |||||||")
            continue
        s, c, i = row["server_latency_ms"], row["client_latency_ms"], row["inference_ms"]
        lines.append(f"| {row['dataset']} | {row['chain']} | {row['images']} | {_fmt(s['p50'])} / {_fmt(s['p95'])} "
                     f"| {_fmt(c['p50'])} / {_fmt(c['p95'])} | {_fmt(i['p50'])} | {_fmt(row['slices_per_s'], '.2f')} "
                     f"| {_fmt(row['peak_rss_mib'], '.0f')} | {row['provider']} |")
    lines += (_markdown_concurrent(report) + _markdown_bart(report) + _markdown_realtime(report)
              + _markdown_soak(report))
    if report.get("plot"):
        lines += ["", f"![latency per slice]({Path(report['plot']).name})"]
    elif report.get("plot_skipped"):
        lines += ["", f"plot skipped: {report['plot_skipped']}"]
    return "\n".join(lines) + "\n"


def _markdown_concurrent(report: dict) -> list[str]:
    rows = report.get("concurrent") or []
    if not rows:
        return []
    lines = ["", "## Concurrent connections replaying the simulated scan at once", "",
             "Images equal: bit-identical to the same scan replayed through one connection alone.", "",
             "| chain | connections | images (equal / expected) | server p50 / p95 ms | slices/s | peak RSS MiB "
             "| RSS before / after idle MiB | slices per network batch |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if row.get("failure"):
            lines.append(f"| {row['chain']} | {row['connections']} | FAILED: {row['failure']} ||||||")
            continue
        s = row["server_latency_ms"]
        batches = ", ".join(f"{size}: {count}" for size, count in sorted(row["batch_slices"].items()))
        lines.append(f"| {row['chain']} | {row['connections']} | {row['images_equal']} / {row['images_expected']} "
                     f"| {_fmt(s['p50'])} / {_fmt(s['p95'])} | {_fmt(row['slices_per_s'], '.2f')} "
                     f"| {_fmt(row['peak_rss_mib'], '.0f')} | {_fmt(row.get('rss_before_mib'), '.0f')} / "
                     f"{_fmt(row.get('rss_after_idle_mib'), '.0f')} ({_fmt(row.get('after_idle_s'), '.0f')} s) "
                     f"| {batches or '-'} |")
    return lines


def _markdown_bart(report: dict) -> list[str]:
    lines: list[str] = []
    bart = report.get("bart")
    if bart:
        lines += ["", "## BART l1-ESPIRiT on the same simulated slices", ""]
        if "skipped" in bart:
            lines.append(f"skipped: {bart['skipped']}")
        else:
            e = bart["ecalib_pics_ms"]
            lines.append(f"`{bart['command']}` ({bart['bart_version']}): ecalib+pics p50 {_fmt(e['p50'], '.0f')} ms, "
                         f"max {_fmt(e['max'], '.0f')} ms over {bart['slices']} slices "
                         f"(ecalib alone p50 {_fmt(bart['ecalib_ms']['p50'], '.0f')} ms)")
    by_dataset = {name: b for name, b in (report.get("bart_by_dataset") or {}).items() if "skipped" not in b}
    if by_dataset:
        lines += ["", "## Classical chains' cores vs BART on the same slices (p50 ms per slice, one thread)", "",
                  "| dataset | slices | BART ecalib + pics -l2 | BART ecalib + pics -l1 | sense core "
                  "| sense core, l1 | grappa core |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, b in by_dataset.items():
            core = b.get("classical_core_ms", {})
            lines.append(f"| {name} {'x'.join(map(str, b.get('shape') or []))} | {b['slices']} "
                         f"| {_fmt(b['ecalib_pics_l2_ms']['p50'], '.0f')} | {_fmt(b['ecalib_pics_ms']['p50'], '.0f')} "
                         f"| {_fmt(core.get('sense', {}).get('p50'), '.0f')} "
                         f"| {_fmt(core.get('sense_l1', {}).get('p50'), '.0f')} "
                         f"| {_fmt(core.get('grappa', {}).get('p50'), '.0f')} |")
    return lines


def _markdown_realtime(report: dict) -> list[str]:
    lines: list[str] = []
    rt = report.get("realtime")
    if rt:
        lines += ["", f"## Real time: {rt['dataset']} paced by its time stamps "
                      f"({rt['slices']} slices, scan {rt['scan_s']:.1f} s)", "",
                  "| chain | server p50 / p95 ms | client p50 / p95 ms | slope ms/slice | first / last p50 ms "
                  "| flat | lag after scan s | real-time factor |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for row in rt["chains"]:
            if row.get("failure"):
                lines.append(f"| {row['chain']} | FAILED: {row['failure']} |||||||")
                continue
            s, c, t = row["server_latency_ms"], row["client_latency_ms"], row["trend_server"]
            lines.append(f"| {row['chain']} | {_fmt(s['p50'])} / {_fmt(s['p95'])} | {_fmt(c['p50'])} / {_fmt(c['p95'])} "
                         f"| {_fmt(t['slope_ms_per_slice'], '.2f')} | {_fmt(t['first_p50_ms'])} / "
                         f"{_fmt(t['last_p50_ms'])} | {'yes' if t['flat'] else 'no'} "
                         f"| {_fmt(row['lag_after_scan_s'], '.2f')} | {_fmt(row['realtime_factor'], '.3f')} |")
        lines += ["", "Real-time factor: unpaced recon time of the same stream / its acquisition time "
                      "(< 1: the server keeps up). Lag after scan: last line sent -> last image received, paced."]
    return lines


def _markdown_soak(report: dict) -> list[str]:
    lines: list[str] = []
    soak = report.get("soak")
    if soak:
        length = (f"{soak['minutes_per_chain']:g} minutes per chain" if soak.get("minutes_per_chain")
                  else f"{soak['slices_requested']} slices")
        lines += ["", f"## Soak: {length}", "",
                  "| chain | replays | images | RSS after warm-up MiB | RSS at end MiB | growth % | server p50 first / last replay ms "
                  "| fds after warm-up / end | threads after warm-up / end |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in soak["chains"]:
            if row.get("failure"):
                lines.append(f"| {row['chain']} | FAILED: {row['failure']} ||||||")
                continue
            lines.append(f"| {row['chain']} | {row['replays']} | {row['images']} | {row['rss_after_warmup_mib']:.0f} "
                         f"| {row['rss_end_mib']:.0f} | {row['growth_percent']:+.1f} "
                         f"| {_fmt(row['server_p50_first_ms'])} / {_fmt(row['server_p50_last_ms'])} "
                         f"| {row.get('counts_after_warmup', {}).get('fds')} / {row.get('counts_end', {}).get('fds')} "
                         f"| {row.get('counts_after_warmup', {}).get('threads')} / "
                         f"{row.get('counts_end', {}).get('threads')} |")
    return lines


def plot(report: dict, path: Path) -> str | None:
    """Latency per slice index for each chain; returns why it was skipped, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench])"
    panels = [("unpaced: " + ds, [r for r in report["runs"] if r["dataset"] == ds and r.get("per_image")])
              for ds in dict.fromkeys(r["dataset"] for r in report["runs"])]
    if report.get("realtime"):
        panels.append((f"real time: {report['realtime']['dataset']}",
                       [r for r in report["realtime"]["chains"] if r.get("per_image")]))
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return "no latencies to plot"
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels):
        for row in rows:
            per_image = row["per_image"]
            x = [p["order"] for p in per_image]
            ax.plot(x, [p["server_ms"] for p in per_image], marker=".", label=f"{row['chain']} server")
            ax.plot(x, [p["client_ms"] for p in per_image], marker=".", linestyle="--", label=f"{row['chain']} client")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("slice (image order in the scan)")
        ax.set_ylabel("latency ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- the bench
def run_bench(out: Path, chains=("zerofill", "pisf"), raws=(), model: str | None = None, slices: int = 10,
              matrix: int = 256, coils: int = 8, accel: int = 4, acs: int = 24, use_shared: bool = True,
              bart_slices: int = 3, realtime: bool = False, realtime_slices: int = 50, tr_ms: float = 8.0,
              soak: int = 0, min_images: int = 10, soak_minutes: float = 0.0, connections=(), after_idle_s: float = 10.0,
              log=print) -> dict:
    """Simulate (and take the shared real raw file), start a server, replay every dataset through
    every chain unpaced, optionally paced and as a soak, then time BART; write bench.json/.md/.png."""
    from gadgets.wire.client import read_raw

    from tools.cli import created_directory

    out = created_directory(out)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "hardware": hardware(),
                    "settings": dict(chains=list(chains), model=model, slices=slices, matrix=matrix, coils=coils,
                                     accel=accel, acs=acs, realtime=realtime, realtime_slices=realtime_slices,
                                     tr_ms=tr_ms, soak=soak, soak_minutes=soak_minutes,
                                     connections=list(connections), after_idle_s=after_idle_s),
                    "runs": []}
    datasets, rt_path = _bench_data(out, raws, use_shared, slices, matrix, coils, accel, acs, realtime,
                                    realtime_slices, tr_ms, log)
    loaded = {name: read_raw(path) for name, path in datasets}

    log(f"starting pisf serve (log: {out / 'server.log'})")
    server, port = start_server(out / "server.log")
    live = LiveServer(port, server.pid, {chain: chain_config_text(chain, model) for chain in chains}, log)
    report["server"] = {"pid": live.pid, "port": port, "rss_idle_mib": (rss_bytes(live.pid) or 0) / 2 ** 20}
    try:
        for name, _ in datasets:
            for chain in chains:
                report["runs"].append(live.unpaced(name, *loaded[name], chain, min_images))
        report["concurrent"] = [live.concurrent(*loaded["simulated"], chain, n, after_idle_s)
                                for chain in chains for n in connections]
        if rt_path is not None:
            report["realtime"] = live.realtime(rt_path, chains, realtime_slices, tr_ms)
        if soak > 0 or soak_minutes > 0:
            report["soak"] = {"slices_requested": soak, "minutes_per_chain": soak_minutes, "dataset": "simulated",
                              "chains": [live.soak(*loaded["simulated"], chain, soak, soak_minutes)
                                         for chain in chains]}
        report["server"]["rss_peak_lifetime_mib"] = (rss_bytes(live.pid, "VmHWM") or 0) / 2 ** 20
    finally:
        stop_server(server)

    # BART on the same k-space, after the server work (no contention)
    if bart_slices > 0:
        report["bart_by_dataset"] = _bart_by_dataset(datasets, bart_slices, out, log)
        report["bart"] = report["bart_by_dataset"]["simulated"]
    _write_report(report, out, log)
    return report


def _bench_data(out: Path, raws, use_shared: bool, slices: int, matrix: int, coils: int, accel: int, acs: int,
                realtime: bool, realtime_slices: int, tr_ms: float, log) -> tuple[list[tuple[str, Path]], Path | None]:
    """([(name, raw file)]: the simulated scan first, then the given or shared real raw files;
    the paced GRE scan for the real-time replay or None)."""
    from tools.rawdata.simulate import simulate

    sim_path = out / "sim.h5"
    log(f"simulating {slices} slices, {matrix}x{matrix}, {coils} coils, R={accel}, ACS {acs} -> {sim_path}")
    simulate(sim_path, matrix=matrix, coils=coils, accel=accel, acs=acs, slices=slices)
    datasets = [("simulated", sim_path)]
    extra = list(raws) or ([SHARED_RAW] if use_shared and SHARED_RAW.is_file() else [])
    datasets += [(Path(p).stem, Path(p)) for p in extra]
    rt_path = None
    if realtime:
        rt_path = out / "sim_realtime.h5"
        log(f"simulating {realtime_slices} GRE slices (TR {tr_ms} ms) for the real-time replay -> {rt_path}")
        simulate(rt_path, matrix=matrix, coils=coils, accel=accel, acs=acs, slices=realtime_slices,
                 sequence="gre", tr=tr_ms)
    return datasets, rt_path


class LiveServer:
    """The running server of one bench: its port and pid, the chain configs, and the three kinds
    of run (unpaced, paced by time stamps, soak), each giving its report entry."""

    def __init__(self, port: int, pid: int, config_texts: dict, log):
        self.port, self.pid, self.config_texts, self.log = port, pid, config_texts, log

    def replay(self, header: str, acquisitions: list, chain: str, realtime: bool = False) -> dict:
        return timed_replay(self.port, self.pid, header, acquisitions, chain, self.config_texts[chain],
                            realtime=realtime)

    def unpaced(self, name: str, header: str, acquisitions: list, chain: str, min_images: int) -> dict:
        """Latency, throughput, RSS: a warm-up, then whole replays until `min_images` images."""
        warm = self.replay(header, warm_up_subset(acquisitions), chain)
        entry = {"dataset": name, "chain": chain}
        if warm["failure"]:
            entry["failure"] = warm["failure"]
            self.log(f"{name} / {chain}: FAILED in warm-up: {warm['failure']}")
            return entry
        rows, wall, peak, failure = [], 0.0, 0, None
        repeats = 0
        while not failure and (repeats == 0 or len(rows) < min_images):
            done = self.replay(header, acquisitions, chain)
            failure = done["failure"]
            rows += image_rows(done["result"])
            wall += done["wall_s"]
            peak = max(peak, done["peak_rss"])
            repeats += 1
            if not done["result"].images:
                break
        for n, row in enumerate(rows):
            row["order"] = n
        entry.update(summarise(rows, wall, peak), replays=repeats, per_image=rows)
        if failure:
            entry["failure"] = failure
        s = entry["server_latency_ms"]
        self.log(f"{name} / {chain}: {entry['images']} images in {repeats} replay(s), server p50 {_fmt(s['p50'])} "
                 f"ms, p95 {_fmt(s['p95'])} ms, {_fmt(entry['slices_per_s'], '.2f')} slices/s, peak RSS "
                 f"{entry['peak_rss_mib']:.0f} MiB" + (f"; FAILED: {failure}" if failure else ""))
        return entry

    def concurrent(self, header: str, acquisitions: list, chain: str, connections: int,
                   after_idle_s: float = 10.0) -> dict:
        """`connections` clients replaying the scan at once: peak RSS, latency, slices per network
        batch (PISF_BatchSlices), every image compared with a replay through one connection, and
        the RSS before the load (after that replay: models warm) and `after_idle_s` after it."""
        from gadgets.wire.client import replay

        entry = {"chain": chain, "connections": connections}
        alone = self.replay(header, acquisitions, chain)          # also the warm-up
        if alone["failure"]:
            entry["failure"] = alone["failure"]
            return entry
        reference = {_image_key(r.image): r.image.data for r in alone["result"].images}
        results: list = [None] * connections
        time.sleep(1.0)  # the single connection's session ends just after its CLOSE
        rss_before = rss_bytes(self.pid) or 0

        def one(k: int) -> None:
            results[k] = replay(None, "127.0.0.1", self.port, chain, config_text=self.config_texts[chain],
                                timeout_s=3600, header_text=header, acquisitions=acquisitions)
        sampler = RssSampler(self.pid)
        sampler.start()
        started = time.monotonic()
        clients = [threading.Thread(target=one, args=(k,)) for k in range(connections)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        wall, peak = time.monotonic() - started, sampler.stop()
        time.sleep(after_idle_s)
        rss_after = rss_bytes(self.pid) or 0
        received = [r.image for result in results for r in result.images]
        failures = [e for result in results for e in result.errors + ([result.error] if result.error else [])]
        equal = sum(np.array_equal(image.data, reference.get(_image_key(image))) for image in received)
        sizes = [_meta_str(image, "PISF_BatchSlices") or "-" for image in received]
        entry.update(summarise([row for result in results for row in image_rows(result)], wall, peak),
                     images_expected=connections * len(reference), images_equal=int(equal),
                     batch_slices={size: sizes.count(size) for size in set(sizes)},
                     rss_before_mib=rss_before / 2 ** 20, rss_after_idle_mib=rss_after / 2 ** 20,
                     after_idle_s=after_idle_s)
        if failures:
            entry["failure"] = "; ".join(failures[:3])
        self.log(f"{connections} connections / {chain}: {equal} of {entry['images_expected']} images equal to one "
                 f"connection's, server p50 {_fmt(entry['server_latency_ms']['p50'])} ms, "
                 f"{_fmt(entry['slices_per_s'], '.2f')} slices/s, peak RSS {entry['peak_rss_mib']:.0f} MiB, "
                 f"RSS before {rss_before / 2 ** 20:.0f} MiB, {after_idle_s:.0f} s after {rss_after / 2 ** 20:.0f} MiB")
        return entry

    def realtime(self, rt_path: Path, chains, realtime_slices: int, tr_ms: float) -> dict:
        """Each chain paced by the time stamps, beside its unpaced reconstruction time."""
        from gadgets.wire.client import read_raw

        header, acquisitions = read_raw(rt_path)
        scan_s = scan_seconds(acquisitions)
        rt = {"dataset": rt_path.name, "slices": realtime_slices, "tr_ms": tr_ms, "scan_s": scan_s, "chains": []}
        for chain in chains:
            entry = {"chain": chain}
            warm = self.replay(header, warm_up_subset(acquisitions), chain)
            unpaced = warm if warm["failure"] else self.replay(header, acquisitions, chain)
            if unpaced["failure"]:
                entry["failure"] = unpaced["failure"]
                rt["chains"].append(entry)
                continue
            self.log(f"real time / {chain}: pacing {len(acquisitions)} lines over {scan_s:.1f} s")
            paced = self.replay(header, acquisitions, chain, realtime=True)
            rows = image_rows(paced["result"])
            entry.update(summarise(rows, paced["wall_s"], paced["peak_rss"]), per_image=rows)
            entry["trend_server"] = trend([r["server_ms"] for r in rows])
            entry["trend_client"] = trend([r["client_ms"] for r in rows])
            entry["unpaced_recon_s"] = unpaced["wall_s"]
            entry["realtime_factor"] = unpaced["wall_s"] / scan_s if scan_s > 0 else None
            entry["lag_after_scan_s"] = paced["wall_s"] - paced["result"].send_seconds
            if paced["failure"]:
                entry["failure"] = paced["failure"]
            rt["chains"].append(entry)
            t = entry["trend_server"]
            self.log(f"real time / {chain}: server p50 {_fmt(entry['server_latency_ms']['p50'])} ms, slope "
                     f"{_fmt(t['slope_ms_per_slice'], '.2f')} ms/slice, first/last p50 {_fmt(t['first_p50_ms'])}/"
                     f"{_fmt(t['last_p50_ms'])} ms, real-time factor {_fmt(entry['realtime_factor'], '.3f')}")
        return rt

    def soak(self, header: str, acquisitions: list, chain: str, soak: int, soak_minutes: float) -> dict:
        """`soak` slices back to back (or `soak_minutes` minutes of them), RSS after each replay."""
        entry = {"chain": chain, "rss_mib": [], "server_p50_ms": []}
        images = replays = 0
        started = time.monotonic()
        deadline = started + soak_minutes * 60

        def more() -> bool:
            return time.monotonic() < deadline if soak_minutes > 0 else images < soak

        while more():
            done = self.replay(header, acquisitions, chain)
            if done["failure"]:
                entry["failure"] = done["failure"]
                break
            replays += 1
            images += len(done["result"].images)
            entry["rss_mib"].append((rss_bytes(self.pid) or 0) / 2 ** 20)
            # fds and threads once the connection is closed (after the first replay = warmed up)
            time.sleep(0.2)  # the session thread ends just after CLOSE
            counts = process_counts(self.pid)
            if replays == 1:
                entry["counts_after_warmup"] = counts
            entry["counts_end"] = counts
            entry["server_p50_ms"].append(percentiles(r["server_ms"] for r in image_rows(done["result"]))["p50"])
        entry["seconds"] = time.monotonic() - started
        entry.update(replays=replays, images=images)
        if entry["rss_mib"]:
            base, end = entry["rss_mib"][0], entry["rss_mib"][-1]
            entry.update(rss_after_warmup_mib=base, rss_end_mib=end,
                         growth_percent=(end - base) / base * 100 if base else 0.0,
                         server_p50_first_ms=entry["server_p50_ms"][0],
                         server_p50_last_ms=entry["server_p50_ms"][-1])
            a, b = entry.get("counts_after_warmup", {}), entry.get("counts_end", {})
            self.log(f"soak / {chain}: {images} slices in {replays} replays over {entry['seconds']:.0f} s, "
                     f"RSS {base:.0f} -> {end:.0f} MiB ({entry['growth_percent']:+.1f} %), fds "
                     f"{a.get('fds')} -> {b.get('fds')}, threads {a.get('threads')} -> {b.get('threads')}")
        return entry


def _bart_by_dataset(datasets: list[tuple[str, Path]], bart_slices: int, out: Path, log) -> dict:
    """BART and the classical cores timed on `bart_slices` slices of each dataset."""
    by_dataset = {}
    for name, path in datasets:
        log(f"timing BART and the classical cores on {bart_slices} slices of {name} (OMP_NUM_THREADS=1)")
        by_dataset[name] = bart_times(path, bart_slices, out)
    for name, bart in by_dataset.items():
        if "ecalib_pics_ms" in bart:
            core = bart.get("classical_core_ms", {})
            log(f"{name}: BART ecalib+pics -l1 p50 {bart['ecalib_pics_ms']['p50']:.0f} ms, -l2 "
                f"{bart['ecalib_pics_l2_ms']['p50']:.0f} ms; sense core {core['sense']['p50']:.0f} ms, "
                f"grappa core {core['grappa']['p50']:.0f} ms per slice")
        else:
            log(f"{name}: BART skipped: {bart['skipped']}")
    return by_dataset


def _write_report(report: dict, out: Path, log) -> None:
    skipped = plot(report, out / "bench.png")
    if skipped is None:
        report["plot"] = str(out / "bench.png")
    else:
        report["plot_skipped"] = skipped
        log(f"plot skipped: {skipped}")
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(markdown(report))
    log(f"wrote {out / 'bench.md'}, {out / 'bench.json'}" + (f", {out / 'bench.png'}" if skipped is None else ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", type=Path, nargs="+", default=[],
                        help="extra ISMRMRD raw files to replay (default: the shared Siemens file when present)")
    parser.add_argument("--no-shared", action="store_true", help="do not replay the shared Siemens file")
    parser.add_argument("--chains", nargs="+", default=["zerofill", "pisf"])
    parser.add_argument("--model", help="ONNX model for the pisf chain (sent as a CONFIG_TEXT chain)")
    parser.add_argument("--slices", type=int, default=10, help="slices of the simulated dataset")
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--accel", type=int, default=4)
    parser.add_argument("--acs", type=int, default=24)
    parser.add_argument("--bart-slices", type=int, default=3, help="slices timed with BART (0: skip)")
    parser.add_argument("--realtime", action="store_true", help="also replay a GRE dataset paced by its time stamps")
    parser.add_argument("--realtime-slices", type=int, default=50)
    parser.add_argument("--tr", type=float, default=8.0, help="GRE TR in ms of the real-time dataset")
    parser.add_argument("--soak", type=int, default=0, metavar="N", help="replay N slices back to back, RSS per replay")
    parser.add_argument("--soak-minutes", type=float, default=0.0, metavar="M",
                        help="soak each chain for M minutes instead of N slices (RSS, fds, threads per replay)")
    parser.add_argument("--connections", type=int, nargs="+", default=[], metavar="N",
                        help="also replay the simulated scan through N connections at once (peak RSS, latency, "
                             "images against one connection's), for each N given")
    parser.add_argument("--after-idle", type=float, default=10.0, metavar="S",
                        help="with --connections: read the server's RSS S seconds after the load ends (is memory "
                             "handed back?) (default: %(default)s)")
    parser.add_argument("--min-images", type=int, default=10,
                        help="replay each dataset until at least this many images were measured")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))


def _problem(args: argparse.Namespace) -> str | None:
    """The first option the bench cannot run with, as `what; what to do` (None: all fine); checked
    before the minutes of simulation a bench starts with."""
    from gadgets.chain import ChainRepository

    if args.model and not Path(args.model).is_file():
        return f"--model {args.model}: no such file; give an ONNX model (models/*.onnx)"
    missing = [str(path) for path in args.raw if not Path(path).is_file()]
    if missing:
        return f"--raw {', '.join(missing)}: no such file; check the path (ISMRMRD raw files, `pisf convert` others)"
    available = ChainRepository.shared().names()
    unknown = [chain for chain in args.chains if chain not in available]
    if unknown:
        return f"--chains {' '.join(unknown)}: no such chain; choose from {', '.join(available)}"
    counts = {"--slices": args.slices, "--coils": args.coils, "--accel": args.accel, "--min-images": args.min_images,
              "--realtime-slices": args.realtime_slices}
    counts.update({"--connections": n for n in args.connections if n < 1})
    for option, value in counts.items():
        if value < 1:
            return f"{option} {value}: must be at least 1; see `pisf bench --help`"
    if args.matrix < 16 or args.matrix % 2:
        return f"--matrix {args.matrix}: must be even and at least 16; see `pisf bench --help`"
    for option, value in {"--acs": args.acs, "--bart-slices": args.bart_slices, "--soak": args.soak,
                          "--soak-minutes": args.soak_minutes, "--after-idle": args.after_idle}.items():
        if not value >= 0:
            return f"{option} {value:g}: must be 0 or more; see `pisf bench --help`"
    if not args.tr > 0:
        return f"--tr {args.tr:g}: must be positive (ms); see `pisf bench --help`"
    return None


def run(args: argparse.Namespace) -> int:
    from tools.cli import CommandError

    problem = _problem(args)
    if problem:
        raise CommandError(problem)
    report = run_bench(args.out, chains=args.chains, raws=args.raw, model=args.model, slices=args.slices,
                       matrix=args.matrix, coils=args.coils, accel=args.accel, acs=args.acs,
                       use_shared=not args.no_shared, bart_slices=args.bart_slices, realtime=args.realtime,
                       realtime_slices=args.realtime_slices, tr_ms=args.tr, soak=args.soak,
                       min_images=args.min_images, soak_minutes=args.soak_minutes, connections=args.connections,
                       after_idle_s=args.after_idle)
    print()
    print(markdown(report))
    failed = [r for r in report["runs"] if r.get("failure")]
    failed += [r for r in (report.get("realtime") or {}).get("chains", []) if r.get("failure")]
    failed += [r for r in (report.get("soak") or {}).get("chains", []) if r.get("failure")]
    failed += [r for r in report.get("concurrent", []) if r.get("failure") or r["images_equal"] < r["images_expected"]]
    return 1 if failed else 0

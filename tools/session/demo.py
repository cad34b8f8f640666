"""`pisf demo`: the main job end to end on a fresh machine.

Simulates a multi-slice raw dataset, starts the embedded server as its own process, replays the
raw data through it for each chain (as a scanner would stream it), writes ISMRMRD images and
PNG previews, and prints per-image latency and PSNR/SSIM against the simulated ground truth.
Beside the images, `report/` holds what tools/session/report.py writes: metrics.json/.csv, a side-by-side
PNG per slice (reference, every chain, error maps on one scale), a quality+latency plot and, for
cine (`--phases N`), an animated GIF per slice.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gadgets.chain import ChainRepository
from gadgets.wire.client import replay, summarise_latency, write_images, write_pngs
from tools.session.server_process import free_port, start_server_process, stop_server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory")
    parser.add_argument("--matrix", type=int, default=256, help="recon matrix (square)")
    parser.add_argument("--coils", type=int, default=8, help="receive coils")
    parser.add_argument("--slices", type=int, default=6, help="slices")
    parser.add_argument("--phases", type=int, default=1, help="cine phases (>1: an animated GIF per slice)")
    parser.add_argument("--accel", type=int, default=4, help="undersampling factor R along ky")
    parser.add_argument("--acs", type=int, default=24, help="fully sampled centre lines")
    parser.add_argument("--chains", nargs="+", default=None,
                        help="chains to replay through (default: every chain in config/)")
    parser.add_argument("--realtime", action="store_true", help="pace lines by their time stamps")


def _problem(args: argparse.Namespace) -> str | None:
    """The first value the demo cannot simulate, as `what; what to do` (None: all fine)."""
    checks = [(args.matrix >= 16 and args.matrix % 2 == 0, f"--matrix {args.matrix}: must be even and at least 16"),
              (args.coils >= 1, f"--coils {args.coils}: must be at least 1"),
              (args.slices >= 1, f"--slices {args.slices}: must be at least 1"),
              (args.phases >= 1, f"--phases {args.phases}: must be at least 1"),
              (args.accel >= 1, f"--accel {args.accel}: must be at least 1"),
              (args.acs >= 0, f"--acs {args.acs}: must be 0 or more")]
    for fine, message in checks:
        if not fine:
            return f"{message}; see `pisf demo --help`"
    return None


def run(args: argparse.Namespace) -> int:
    from tools.rawdata.groundtruth import GroundTruth
    from tools.session.report import format_table, panels_from_images, write_report
    from tools.rawdata.simulate import simulate

    from tools.cli import CommandError, created_directory

    out = args.out
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a directory")
    problem = _problem(args)
    if problem:
        raise CommandError(problem)
    available = ChainRepository.shared().names()
    chains = args.chains or available
    chains = sorted(chains, key=lambda chain: chain != "zerofill")  # the baseline first, in tables and figures
    unknown = [c for c in chains if c not in available]
    if unknown:
        raise CommandError(f"unknown chain(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    created_directory(out)
    raw_path = out / "raw.h5"
    print(f"1/3 simulating {args.slices} slices x {args.phases} phase(s), {args.matrix}x{args.matrix}, "
          f"{args.coils} coils, R={args.accel}")
    try:
        simulated = simulate(raw_path, matrix=args.matrix, coils=args.coils, accel=args.accel, acs=args.acs,
                             slices=args.slices, phases=args.phases, verbose=True)
    except ValueError as exc:   # combinations simulate() checks itself (partial Fourier vs ACS)
        raise CommandError(f"{exc}; see `pisf simulate --help` for what can be simulated") from exc
    truth = GroundTruth(rss=simulated["rss"], path="/dataset/pisf_groundtruth")

    port = free_port()
    print(f"2/3 starting the embedded server on 127.0.0.1:{port} (log: {out / 'server.log'})")
    try:
        server = start_server_process(port, out / "server.log")
    except RuntimeError as exc:
        raise CommandError(str(exc)) from exc  # says which log to read
    failures = 0
    panels = {}
    images_path = out / "images.h5"
    try:
        for chain in chains:
            print(f"3/3 replaying {raw_path} through chain '{chain}' ({chains.index(chain) + 1} of {len(chains)})")
            result = replay(raw_path, "127.0.0.1", port, chain, realtime=args.realtime, verbose=True,
                            progress=True)
            if result.error or result.errors or not result.closed:
                print(f"chain {chain}: FAILED ({'; '.join(result.errors) or result.error})")
                failures += 1
                continue
            write_images(result, images_path, group=chain)
            pngs = write_pngs(result, out / f"png_{chain}")
            print(f"\nchain {chain}: {len(result.images)} images -> {images_path} (group '{chain}'), "
                  f"{len(pngs)} PNGs in {out / f'png_{chain}'}; {summarise_latency(result.latencies())}")
            panels.update(panels_from_images(result.images, chain, qualify=True))
    finally:
        stop_server(server)
    if panels:
        report = write_report(out / "report", panels, truth,
                              f"simulated {args.matrix}x{args.matrix}, {args.coils} coils, R={args.accel}")
        print("\nquality against the simulated ground truth:")
        print(format_table(report.rows))
        print(f"\nreport in {out / 'report'}: " + ", ".join(p.name for p in report.files))
    return 1 if failures else 0

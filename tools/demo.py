"""`pisf demo`: the main job end to end on a fresh machine.

Simulates a multi-slice raw dataset, starts the embedded server as its own process, replays the
raw data through it for each chain (as a scanner would stream it), writes ISMRMRD images and
PNG previews, and prints per-image latency and PSNR/SSIM against the simulated ground truth.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from gadgets.chain import ChainRepository
from gadgets.wire.client import replay, summarise_latency, write_images, write_pngs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server_process(port: int, log_path: Path, timeout_s: float = 60.0) -> subprocess.Popen:
    """`pisf serve` in its own process; returns once it accepts connections."""
    with open(log_path, "w") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--port", str(port)],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"\x04\x00")  # CLOSE: a polite probe the server answers and forgets
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start within {timeout_s:.0f} s; see {log_path}")


def image_quality(result, truth_rss: np.ndarray) -> list[dict]:
    """PSNR/SSIM/NMSE of each received image against the ground-truth RSS [slice, phase, y, x]."""
    from tools.metrics import nmse, psnr, scale_match, ssim

    rows = []
    for received in sorted(result.images, key=lambda r: (r.image.slice, r.image.phase)):
        image = received.image
        truth = truth_rss[image.slice, image.phase].astype(np.float64)
        recon = scale_match(np.asarray(image.data[0, 0], dtype=np.float64), truth)
        rows.append(dict(slice=image.slice, phase=image.phase, psnr=psnr(truth, recon), ssim=ssim(truth, recon),
                         nmse=nmse(truth, recon), latency_ms=(received.latency_s or float("nan")) * 1e3))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory")
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--accel", type=int, default=4)
    parser.add_argument("--acs", type=int, default=24)
    parser.add_argument("--chains", nargs="+", default=None,
                        help="chains to replay through (default: every chain in config/)")
    parser.add_argument("--realtime", action="store_true", help="pace lines by their time stamps")


def run(args: argparse.Namespace) -> int:
    from tools.simulate import simulate

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / "raw.h5"
    print(f"1/3 simulating {args.slices} slices, {args.matrix}x{args.matrix}, {args.coils} coils, R={args.accel}")
    simulated = simulate(raw_path, matrix=args.matrix, coils=args.coils, accel=args.accel, acs=args.acs,
                         slices=args.slices, verbose=True)
    truth = simulated["rss"]

    port = _free_port()
    print(f"2/3 starting the embedded server on 127.0.0.1:{port} (log: {out / 'server.log'})")
    server = start_server_process(port, out / "server.log")
    chains = args.chains or ChainRepository.shared().names()
    failures = 0
    try:
        for chain in chains:
            print(f"3/3 replaying {raw_path} through chain '{chain}' ({chains.index(chain) + 1} of {len(chains)})")
            result = replay(raw_path, "127.0.0.1", port, chain, realtime=args.realtime, verbose=True,
                            progress=True)
            if result.error or result.errors or not result.closed:
                print(f"chain {chain}: FAILED ({'; '.join(result.errors) or result.error})")
                failures += 1
                continue
            images_path = out / "images.h5"
            write_images(result, images_path, group=chain)
            pngs = write_pngs(result, out / f"png_{chain}")
            rows = image_quality(result, truth)
            print(f"\nchain {chain}: {len(result.images)} images -> {images_path} (group '{chain}'), "
                  f"{len(pngs)} PNGs in {out / f'png_{chain}'}")
            print(" slice phase   PSNR dB   SSIM     NMSE    latency ms")
            for row in rows:
                print(f" {row['slice']:5d} {row['phase']:5d} {row['psnr']:9.2f} {row['ssim']:7.4f} "
                      f"{row['nmse']:8.5f} {row['latency_ms']:11.1f}")
            print(f" mean PSNR {np.mean([r['psnr'] for r in rows]):.2f} dB, mean SSIM "
                  f"{np.mean([r['ssim'] for r in rows]):.4f}; {summarise_latency(result.latencies())}\n")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 1 if failures else 0

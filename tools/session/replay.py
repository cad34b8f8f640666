"""`pisf replay`: stream an ISMRMRD raw file to a recon server like a scanner, and show what came back.

Prints every TEXT from the server, progress while sending lines and while waiting for images
(received of expected), per-image latency, and PSNR/SSIM per image when the raw file carries
ground truth (tools/rawdata/groundtruth.py). Writes the images (`--out`, ISMRMRD), PNG previews windowed
as the console windows them (`--png`), DICOM (`--dicom`) and the physicist's report (`--report`,
by default OUT_report/GROUP/ beside `--out`, one per output group): metrics JSON/CSV (a row per
image), a side-by-side PNG per slice (reference, zero-filled computed here from the same raw data,
the chain, error maps on one scale), a quality+latency plot and, for cine, an animated GIF per
slice (tools/session/report.py).

Options follow the other clients where they overlap: -a/--host, -p/--port, -c/--config,
-C/--config-file, -g/--group (input group), -o/--out, -G/--out-group.
Without -c the server runs its default chain (`pisf serve --default-chain`, the product's pisf).
Mistakes (missing file, not ISMRMRD, no server, an output path that is a file) end in one line
on stderr and exit status 2; a scan the server refused ends with status 1, sending stopped at the
server's first ERROR. Ctrl-C ends with status 130 and keeps the images received so far (`--out`).
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import ssl
import sys
from pathlib import Path

import h5py

from gadgets.wire.client import (DEFAULT_CHAIN, RawFileError, ReplayInterrupted, default_group_name, read_raw,
                                 replay, resolve_raw_group, summarise_latency, write_images, write_pngs)
from tools.cli import CommandError, created_directory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw", type=Path, help="ISMRMRD raw data file (HDF5)")
    parser.add_argument("-g", "--group", default=None,
                        help="input group holding the raw data (default: 'dataset', else the only raw data group)")
    parser.add_argument("-a", "--host", default="127.0.0.1", help="server address")
    parser.add_argument("-p", "--port", type=int, default=9002, help="server port")
    parser.add_argument("-c", "--config", default=None,
                        help="chain name sent as CONFIG_FILE (id 1) (default: the server's default chain, "
                             "`pisf serve --default-chain`: pisf, the product's recon)")
    parser.add_argument("-C", "--config-file", type=Path,
                        help="send this file's text as CONFIG_TEXT (id 2) instead of --config (YAML or Gadgetron XML chain)")
    parser.add_argument("--parameters",
                        help="JSON config sent as TEXT after the header, FIRE style: "
                             "'{\"parameters\": {\"image_finish.series_index\": 5}}' (docs/PROTOCOL.md, JSON parameters)")
    parser.add_argument("-o", "--out", type=Path, help="write the received images to this ISMRMRD HDF5 file (appended)")
    parser.add_argument("-G", "--out-group", default=None,
                        help="image group in --out (default: pisf_<config>_<YYYYmmdd_HHMMSS>)")
    parser.add_argument("--png", type=Path, help="directory for one PNG per image, windowed like the console")
    parser.add_argument("--report", type=Path, default=None,
                        help="directory for metrics, comparison PNGs, quality/latency plot, cine GIFs "
                             "(default: OUT_report/GROUP/ beside --out, one per output group; none without --out)")
    parser.add_argument("--no-report", action="store_true", help="write no report, even with --out")
    parser.add_argument("--dicom", type=Path, help="directory for the images as DICOM MR series")
    parser.add_argument("--realtime", action="store_true", help="pace lines by their acquisition time stamps")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the server (connect, and images after the last line)")
    parser.add_argument("--tls", action="store_true", help="connect over TLS (server started with --tls-cert)")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA certificate to verify the server with (implies --tls)")


# ---------------------------------------------------------------- checks before anything is sent

def _output_directory(option: str, path: Path | None) -> None:
    if path is not None and path.exists() and not path.is_dir():
        raise CommandError(f"{option} {path} is a file; give a directory (it is created if missing)")


def _raw_file_problem(path: Path, problem: RawFileError) -> CommandError:
    """The one line for a file that is not ISMRMRD raw data: raw data of a kind `pisf convert`
    reads says how to convert it."""
    from tools.rawdata.convert import detect_format
    from tools.rawdata.source import ConvertError

    kinds = {"twix": "Siemens raw data (twix)", "fastmri": "fastMRI k-space", "cmrxrecon": "CMRxRecon k-space",
             "bart": "BART k-space"}
    try:
        kind = detect_format(path) if path.is_file() else None
        with open(path, "rb") as handle:
            matlab = handle.read(6) == b"MATLAB"
    except (ConvertError, OSError, ValueError):
        kind = None
    if kind == "cmrxrecon" and not matlab:
        kind = None  # a `kspace` dataset in a plain HDF5 file: too weak a sign to name the format
    message = str(problem)
    if kind is None:
        if ";" in message or not path.is_file():
            return CommandError(message)
        return CommandError(f"{message}; give an ISMRMRD raw data file (`pisf convert` turns twix, fastMRI, "
                            f"CMRxRecon and BART k-space into one)")
    converted = f"{path.stem}_ismrmrd.h5"  # in the working directory: the input's may be read-only
    return CommandError(f"this is {kinds[kind]}, not ISMRMRD ({path}); convert it with `pisf convert {path} --out "
                        f"{converted}`, then `pisf replay {converted}`")


def _check_arguments(args: argparse.Namespace) -> str:
    """Everything that can be checked before connecting; returns the input group."""
    try:
        group = resolve_raw_group(args.raw, args.group)
    except RawFileError as exc:
        raise _raw_file_problem(args.raw, exc) from None
    for option, path in (("--png", args.png), ("--report", args.report), ("--dicom", args.dicom)):
        _output_directory(option, path)
    if args.out is not None:
        if args.out.is_dir():
            raise CommandError(f"--out {args.out} is a directory; give a file name such as {args.out / 'images.h5'}")
        if args.out.exists() and not h5py.is_hdf5(str(args.out)):
            raise CommandError(f"--out {args.out} exists and is not an HDF5 file; not overwriting it")
    if args.config_file is not None and not args.config_file.is_file():
        raise CommandError(f"--config-file {args.config_file}: no such file; check the path (a YAML or Gadgetron "
                           f"XML chain)")
    if args.tls_ca is not None and not args.tls_ca.is_file():
        raise CommandError(f"--tls-ca {args.tls_ca}: no such file; give the PEM certificate that signed the "
                           f"server's")
    if args.parameters is not None:
        try:
            document = json.loads(args.parameters)
        except ValueError as exc:
            raise CommandError(f"--parameters is not valid JSON ({exc}); quote it whole, e.g. "
                               "'{\"parameters\": {\"seriesindex\": 5}}'") from None
        if not isinstance(document, dict):
            raise CommandError("--parameters is not a JSON object; give one, e.g. "
                               "'{\"parameters\": {\"seriesindex\": 5}}'")
    if not 0 < args.port < 65536:
        raise CommandError(f"--port {args.port} is not a TCP port; give 1..65535 (the server's, 9002 by default)")
    if args.timeout <= 0:
        raise CommandError(f"--timeout {args.timeout:g} is not positive; give seconds, e.g. 600")
    return group


def _connection_error(exc: OSError, args: argparse.Namespace) -> CommandError:
    where = f"{args.host}:{args.port}"
    if isinstance(exc, ConnectionRefusedError):
        return CommandError(f"no server is listening on {where}; start one with `pisf serve --port {args.port}` "
                            f"(in another terminal), or point -a/--host and -p/--port at a running one")
    if isinstance(exc, socket.gaierror):
        return CommandError(f"cannot resolve host {args.host!r} ({exc.strerror or exc}); check -a/--host")
    if isinstance(exc, ssl.SSLError):
        return CommandError(f"TLS with {where} failed ({exc.reason or exc}); start the server with --tls-cert and "
                            f"give --tls-ca the certificate that signs it")
    if isinstance(exc, TimeoutError | socket.timeout):
        return CommandError(f"no answer from {where} within {args.timeout:.0f} s; check that the server runs "
                            f"there, or raise --timeout")
    return CommandError(f"cannot connect to {where} ({exc.strerror or exc}); check -a/--host and -p/--port")


# ---------------------------------------------------------------- the physicist's view

def zero_filled_panels(header_text: str, acquisitions: list) -> dict:
    """{ImageKey: Panel} of the zero-filled recon of the same raw data, computed here (no
    server): the baseline every chain is compared with. Empty when it cannot be computed."""
    from gadgets.chain import ChainRepository, run_stages
    from gadgets.context import StreamContext, parse_header
    from gadgets.wire.client import ReceivedImage
    from tools.session.report import panels_from_images

    try:
        spec = ChainRepository.shared().load("zerofill")
        context = StreamContext(header=parse_header(header_text), log=logging.getLogger("pisf.replay.zerofill"))
        outputs = run_stages(spec.build(context), iter(acquisitions))
        images = [ReceivedImage(item, None) for item in outputs if hasattr(item, "image_series_index")]
    except Exception as exc:  # a baseline only: the chain's images are what matter
        logging.getLogger("pisf.replay").info("no local zero-filled baseline: %s", exc)
        return {}
    return next(iter(panels_from_images(images, "zero-filled").values()), {})


def _quality(args, result, group, header_text, acquisitions, report_dir, label):
    """Print PSNR/SSIM (with ground truth) and write the report; returns the report or None."""
    from tools.rawdata.groundtruth import read_groundtruth
    from tools.session.report import compute_rows, format_table, panels_from_images, write_report

    try:
        truth = read_groundtruth(args.raw, group)
    except (OSError, KeyError, ValueError) as exc:
        print(f"ground truth in {args.raw} could not be read: {exc}")
        truth = None
    panels = panels_from_images(result.images, label)
    if truth is not None:
        rows, notes = compute_rows(panels, truth)
        print(f"\nquality against the ground truth in {args.raw} ({truth.path}):")
        print(format_table(rows))
        for note in notes:
            print(f" note: {note}")
    if report_dir is None:
        return None
    if "zerofill" not in label:
        baseline = zero_filled_panels(header_text, acquisitions)
        if baseline:
            panels = {"zero-filled (local)": baseline, **panels}
    report = write_report(report_dir, panels, truth, f"{args.raw.name} through {label}")
    print(f"report in {report_dir}: " + ", ".join(p.name for p in report.files[:4])
          + (f" and {len(report.files) - 4} more" if len(report.files) > 4 else ""))
    return report


def run(args: argparse.Namespace) -> int:
    group = _check_arguments(args)
    header_text, acquisitions = read_raw(args.raw, group)
    if not acquisitions:
        raise CommandError(f"{args.raw} group {group!r} holds no acquisitions; give a file (or -g group) with "
                           f"raw data")
    config_text = args.config_file.read_text() if args.config_file else None
    config = args.config or DEFAULT_CHAIN
    # Without -c the server's answer to pisf::configs names its default chain (for labels and groups).
    queries = ("pisf::configs",) if args.config is None and config_text is None else ()
    try:
        result = replay(args.raw, args.host, args.port, config, config_text, args.realtime, args.parameters,
                        verbose=True, progress=True, timeout_s=args.timeout, header_text=header_text,
                        acquisitions=acquisitions, tls=args.tls or args.tls_ca is not None, tls_ca=args.tls_ca,
                        queries=queries)
    except ReplayInterrupted as stop:
        return _interrupted(args, stop.result, _chain_label(args, stop.result))
    except OSError as exc:
        raise _connection_error(exc, args) from None
    label = _chain_label(args, result)
    stopped = (f" (of {result.acquisitions_total}; stopped at the server's ERROR)"
               if result.acquisitions_sent < result.acquisitions_total and result.stopped_at_error else "")
    print(f"sent {result.acquisitions_sent} acquisitions{stopped} in {result.send_seconds:.2f} s, "
          f"received {len(result.images)} images")
    if result.images:
        print(summarise_latency(result.latencies()))
    _write_outputs(args, result, label, group, header_text, acquisitions)
    if result.errors:  # the server's own words first: a broken pipe after them is only a consequence
        refusal = result.errors[0].removeprefix("ERROR:").strip()
        print(f"pisf replay: error: the server refused the scan: {refusal}"
              + ("" if ";" in refusal else "; check -c/--config and --parameters (the server log says more)"),
              file=sys.stderr)
    elif result.error:
        hint = ("name a chain with -c (the default chain is asked for by the name 'default', which only a pisf "
                "server knows)" if args.config is None and args.config_file is None and not result.images
                else f"check that the server at {args.host}:{args.port} still runs (its log says more)")
        print(f"pisf replay: error: {result.error}; {hint}", file=sys.stderr)
    return 1 if (result.error or result.errors or not result.closed) else 0


def _chain_label(args: argparse.Namespace, result) -> str:
    """The chain's name for tables, reports and the output group: -c, the config file's name, or
    the default chain the server named (`default -> pisf` in its pisf::configs answer)."""
    if args.config_file is not None:
        return args.config_file.stem
    if args.config is not None:
        return args.config
    for response in result.responses:
        for line in response.splitlines():
            alias, _, target = line.partition(" -> ")
            if alias.strip() == DEFAULT_CHAIN and target.strip():
                return target.strip()
    return DEFAULT_CHAIN


def _out_group(args: argparse.Namespace, label: str) -> str:
    return args.out_group or default_group_name(f"pisf_{label if args.config_file is None else 'config'}")


def _write_outputs(args, result, label, group, header_text, acquisitions) -> None:
    """--out, --png, --dicom, then quality and the report (by default beside --out)."""
    report_dir = None
    if args.out and result.images:
        created_directory(args.out.parent)
        arrays: list[str] = []
        written = write_images(result, args.out, _out_group(args, label), arrays)
        print(f"images written to {args.out} group '{written}' ({', '.join(arrays)})")
        if not args.no_report:
            # one report per output group: a second replay into the same file (another chain, or
            # the same one again) gets its own, never mixed with or overwritten by the first
            report_dir = args.report or args.out.with_name(args.out.stem + "_report") / written
    elif args.report is not None and not args.no_report:
        report_dir = args.report
    if args.png and result.images:
        print(f"{len(write_pngs(result, created_directory(args.png)))} PNG previews in {args.png}")
    if args.dicom and result.images:
        from gadgets.context import parse_header
        from gadgets.formats.dicom import write_dicom

        paths = write_dicom([r.image for r in result.images], created_directory(args.dicom),
                            header=parse_header(header_text))
        print(f"{len(paths)} DICOM files in {args.dicom}")
    if result.images:
        if report_dir is not None:
            created_directory(report_dir)
        _quality(args, result, group, header_text, acquisitions, report_dir, label)


def _interrupted(args: argparse.Namespace, result, label: str) -> int:
    """Ctrl-C: keep what arrived (--out), say so in one line, status 130."""
    sent = f"after sending {result.acquisitions_sent} of {result.acquisitions_total} acquisitions"
    count = len(result.images)
    images = f"{count} image{'' if count == 1 else 's'} received"
    if args.out is None or not result.images:
        kept = "" if not result.images else "; not kept (give -o FILE to keep what arrives)"
        print(f"pisf replay: interrupted {sent}; {images}{kept}", file=sys.stderr)
        return 130
    created_directory(args.out.parent)
    written = write_images(result, args.out, _out_group(args, label))
    print(f"pisf replay: interrupted {sent}; {images}, kept in {args.out} group '{written}'", file=sys.stderr)
    return 130

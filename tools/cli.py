"""The single `pisf` entry point.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `pisf serve` never imports torch,
and modules must not import torch at module level (import it inside run()).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "serve": ("gadgets.wire.server", "run the embedded ISMRMRD streaming recon server"),
    "replay": ("gadgets.wire.client", "stream an ISMRMRD raw file to a server and collect the images"),
    "simulate": ("tools.simulate", "write a physics-informed simulated ISMRMRD raw dataset"),
    "demo": ("tools.demo", "main job: serve + simulate + replay + quality against ground truth"),
    "train": ("tools.train", "train the PISF network on on-the-fly synthetic data"),
    "export": ("tools.export", "export a PISF checkpoint to ONNX (with a parity check)"),
    "evaluate": ("tools.evaluate", "PISF models vs zero-filled vs tuned BART SENSE and l1-ESPIRiT on the real data"),
    "bench": ("tools.bench", "latency, throughput and memory of the server per chain, BART beside it"),
    "bench-model": ("tools.bench_pisf", "offline latency of the PISF inference core per model and thread count"),
    "dicom": ("tools.dicom", "convert ISMRMRD images (pisf replay --out) to DICOM MR series"),
    "fuzz": ("tools.fuzz", "fuzz the protocol reader and a live server with mutated frames"),
    "gadgetron-worker": ("gadgets.gadgetron_external.worker",
                         "persistent external-gadget process for <external><connect>"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (all of them for --help)."""
    parser = argparse.ArgumentParser(prog="pisf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        if command == name:
            importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The single `pisf` entry point.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `pisf serve` never imports torch,
and modules must not import torch at module level (import it inside run()).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "serve": ("gadgets.wire.server", "run the embedded ISMRMRD streaming recon server"),
    "replay": ("tools.session.replay", "stream an ISMRMRD raw file to a server, collect the images, show their quality"),
    "simulate": ("tools.rawdata.simulate", "write a physics-informed simulated ISMRMRD raw dataset"),
    "convert": ("tools.rawdata.convert", "Siemens twix, fastMRI, CMRxRecon or BART raw data -> ISMRMRD raw file"),
    "demo": ("tools.session.demo", "main job: serve + simulate + replay + quality against ground truth"),
    "train": ("tools.training.train", "train the PISF network on on-the-fly synthetic data"),
    "export": ("tools.training.export", "export a PISF checkpoint to ONNX (with a parity check)"),
    "evaluate": ("tools.evaluation.evaluate", "PISF models vs zero-filled vs tuned BART SENSE and l1-ESPIRiT on the real data"),
    "classical-table": ("tools.evaluation.classical_table",
                        "the classical chains against BART per case, from a `pisf evaluate` run of their cores"),
    "bench": ("tools.bench.server", "latency, throughput and memory of the server per chain, BART beside it"),
    "bench-model": ("tools.bench.model", "offline latency of the PISF inference core per model and thread count"),
    "dicom": ("tools.session.dicom", "convert ISMRMRD images (pisf replay --out) to DICOM MR series"),
    "fuzz": ("tools.session.fuzz", "fuzz the protocol reader and a live server with mutated frames"),
    "gadgetron-worker": ("gadgets.gadgetron_external.worker",
                         "persistent external-gadget process for <external><connect>"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (options without help text get one too)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is not None and action.default is not argparse.SUPPRESS and action.default is not False
                and action.option_strings and "%(default)" not in text and "default" not in text.lower()):
            text = (text + " " if text else "") + "(default: %(default)s)"
        return text


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (all of them for --help)."""
    parser = argparse.ArgumentParser(prog="pisf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        sp.set_defaults(_module=module_name)
        if command == name:
            importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Whatever goes wrong ends in one line on stderr and a non-zero status
    (PISF_TRACEBACK=1 shows the traceback of an unexpected failure)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"pisf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("PISF_TRACEBACK"):
            raise
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        print(f"pisf {args.command}: error: {type(exc).__name__}: {exc}{where} "
              f"(PISF_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The single `pisf` entry point.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `pisf serve` never imports torch,
and modules must not import torch at module level (import it inside run()).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
import traceback
from pathlib import Path

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


class CommandError(Exception):
    """A mistake the user can fix: the message reads `what is wrong; what to do` and is shown as
    `pisf SUB: error: MESSAGE` (subcommands raise it instead of printing)."""


def created_directory(path: Path | str) -> Path:
    """Make the directory `path` (and its parents) if missing, saying so: the one rule for every
    command that writes files (outputs go where asked; a directory made on the way is announced)."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise CommandError(f"{path} is a file, not a directory; give a directory or another path")
        path.mkdir(parents=True, exist_ok=True)
        print(f"created directory {path}")
    return path


def _input_files(args: argparse.Namespace) -> list[str]:
    """The files named on the command line (an HDF5 error does not name the file it read)."""
    return [str(v) for k, v in vars(args).items()
            if not k.startswith("_") and isinstance(v, (str, Path)) and str(v) and os.path.isfile(v)]


def _hdf5_problem(message: str, args: argparse.Namespace) -> str | None:
    """`what; what to do` for HDF5's open errors (h5py raises a bare OSError without the file name)."""
    if not message.startswith("Unable to") or "open file" not in message:
        return None
    files = _input_files(args)
    name = files[0] if len(files) == 1 else ("an input file" + (f" (one of {', '.join(files)})" if files else ""))
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", message)
    if truncated:
        return (f"{name} is truncated ({int(truncated[1])} of {int(truncated[2])} bytes); copy it again, "
                f"or rerun what wrote it")
    if "file signature not found" in message:
        return f"{name} is not an HDF5 file; give an ISMRMRD HDF5 file (.h5)"
    if "already open" in message:
        return f"{name} is open in another program; close it there and try again"
    return f"{name}: HDF5 cannot read it ({message}); check that the file is complete and is HDF5"


def describe(exc: BaseException, args: argparse.Namespace) -> str:
    """One line `what is wrong; what to do` for an exception that reached the command boundary."""
    if isinstance(exc, CommandError):
        return str(exc)
    if isinstance(exc, OSError):
        hdf5 = _hdf5_problem(str(exc), args)
        if hdf5 is not None:
            return hdf5
        name = exc.filename or ""
        if isinstance(exc, FileNotFoundError) and name:
            return f"{name}: no such file or directory; check the path"
        if isinstance(exc, PermissionError) and name:
            return f"{name}: permission denied; check its permissions or choose another path"
        if isinstance(exc, IsADirectoryError) and name:
            return f"{name} is a directory; give a file"
        if exc.errno == errno.ENOSPC:
            return f"{name or 'the disk'}: no space left on the device; free some space or write elsewhere"
        if exc.strerror:
            return f"{name + ': ' if name else ''}{exc.strerror}; check the path and try again"
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller input (fewer slices, coils or a smaller matrix) or a larger machine"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"the Python package {exc.name!r} is not installed; set up the environment as README says"
    return (f"{type(exc).__name__}: {exc}; this is unexpected: PISF_TRACEBACK=1 shows where (please report it "
            f"with that output)")


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Whatever goes wrong ends in one line on stderr, `pisf SUB: error: what is
    wrong; what to do`, and a non-zero status; PISF_TRACEBACK=1 also shows the traceback."""
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
            traceback.print_exc()
        print(f"pisf {args.command}: error: {describe(exc, args)}", file=sys.stderr)
        return 2 if isinstance(exc, CommandError) else 1


if __name__ == "__main__":
    # `python -m tools.cli`: run the imported module's main, so that the CommandError subcommands
    # raise (tools.cli.CommandError) is the class caught here, not a second copy in __main__
    from tools.cli import main as imported_main

    sys.exit(imported_main())

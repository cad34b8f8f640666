"""`pisf dicom IMAGES.h5 --out DIR`: ISMRMRD images (as `pisf replay --out` writes them) to DICOM."""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.cli import CommandError, created_directory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", type=Path, help="ISMRMRD HDF5 file with <group>/image_<series> groups")
    parser.add_argument("--out", type=Path, required=True, help="directory for the DICOM series")
    parser.add_argument("--group", help="image group (default: the latest replay's, by the time it was written)")
    parser.add_argument("--raw", type=Path, help="raw file whose ISMRMRD header adds patient/study information")
    parser.add_argument("--study-key", help="key the StudyInstanceUID is derived from (default: measurement_uid)")


def _image_group(path: Path, wanted: str | None) -> tuple[str, int]:
    """(group to convert, image groups in the file); a file without images says what it is instead."""
    import h5py

    from gadgets.wire.client import is_image_group, latest_image_group, raw_groups

    if not path.is_file():
        raise CommandError(f"{path}: no such file; give the file `pisf replay RAW -o FILE` wrote")
    with h5py.File(path, "r") as h5:  # not HDF5 at all: the command boundary says so
        groups = [name for name, node in h5.items() if is_image_group(node)]
    if not groups:
        if raw_groups(path):
            raise CommandError(f"{path} holds ISMRMRD raw data, not images; reconstruct it first: "
                               f"`pisf replay {path} -o images.h5`, then `pisf dicom images.h5 --out DIR`")
        raise CommandError(f"{path} holds no ISMRMRD images (no <group>/image_<series>); give the file "
                           f"`pisf replay RAW -o FILE` wrote")
    if wanted is None:
        return latest_image_group(path), len(groups)
    if wanted.strip("/") not in groups:
        raise CommandError(f"{path} has no image group {wanted!r}; choose one of: {', '.join(sorted(groups))}")
    return wanted.strip("/"), len(groups)


def run(args: argparse.Namespace) -> int:
    from gadgets.formats.dicom import read_image_groups, write_dicom

    header = None
    if args.raw:
        from gadgets.context import parse_header
        from gadgets.wire.client import RawFileError, read_raw

        try:
            header = parse_header(read_raw(args.raw, None)[0])
        except RawFileError as exc:
            raise CommandError(f"--raw {exc}" + ("" if ";" in str(exc) else "; give the raw file that was replayed"))

    chosen, count = _image_group(args.images, args.group)
    group, images = read_image_groups(args.images, chosen)
    paths = write_dicom(images, created_directory(args.out), header=header, study_key=args.study_key)
    series = sorted({p.parent.name for p in paths})
    picked = f" (the latest of {count} groups; --group picks another)" if args.group is None and count > 1 else ""
    print(f"{len(paths)} DICOM files from group '{group}'{picked} in {args.out} ({', '.join(series)})")
    return 0 if paths else 1

"""`pisf dicom IMAGES.h5 --out DIR`: ISMRMRD images (as `pisf replay --out` writes them) to DICOM."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", type=Path, help="ISMRMRD HDF5 file with <group>/image_<series> groups")
    parser.add_argument("--out", type=Path, required=True, help="directory for the DICOM series")
    parser.add_argument("--group", help="image group (default: the last one, i.e. the latest replay)")
    parser.add_argument("--raw", type=Path, help="raw file whose ISMRMRD header adds patient/study information")
    parser.add_argument("--study-key", help="key the StudyInstanceUID is derived from (default: measurement_uid)")


def run(args: argparse.Namespace) -> int:
    from gadgets.formats.dicom import read_image_groups, write_dicom

    header = None
    if args.raw:
        from gadgets.context import parse_header
        from gadgets.wire.client import read_raw

        header = parse_header(read_raw(args.raw)[0])
    group, images = read_image_groups(args.images, args.group)
    paths = write_dicom(images, args.out, header=header, study_key=args.study_key)
    series = sorted({p.parent.name for p in paths})
    print(f"{len(paths)} DICOM files from group '{group}' in {args.out} ({', '.join(series)})")
    return 0 if paths else 1

"""`pisf convert`: vendor and public-dataset raw files -> ISMRMRD raw files that `pisf replay` streams.

Formats (recognised from the content; `--format` forces one):

| format | input | reader |
|---|---|---|
| twix | Siemens `.dat`, VB and VD/VE multi-raid | tools/rawdata/readers/twix.py (twixtools) |
| fastmri | fastMRI multicoil `.h5`: `kspace` [slice, coil, readout, PE], `ismrmrd_header` | tools/rawdata/readers/fastmri.py |
| cmrxrecon | CMRxRecon `.mat` (MATLAB v7.3): k-space (kx, ky, coil, slice, frame) | tools/rawdata/readers/cmrxrecon.py |
| bart | BART `.cfl` + `.hdr` | tools/rawdata/readers/bart.py |

Every reader turns its file into a `Source` (tools/rawdata/source.py): an ISMRMRD header and the
readouts in the order a scanner streams them (`Line`: what it is, its image, its ky, and how to
build its acquisition).
This module then, for all formats alike:

* optionally undersamples retrospectively along ky (`--undersample`, masks below), embedding the
  fully sampled centre as ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING lines or sending it as separate
  ACQ_IS_PARALLEL_CALIBRATION reference lines before each image's lines (`--reference separate`);
* sets FIRST/LAST_IN_SLICE on the first/last imaging line of every image (slice, contrast, phase,
  repetition, set) and LAST_IN_MEASUREMENT on the last line, numbers the scans;
* when the input is fully sampled, writes the fully sampled reference as ground truth (the
  `zerofill` chain's own stages run on all lines: prewhitening, oversampling removal,
  placement, RSS; cropped to the recon matrix) in the group `pisf replay` and `pisf demo` read,
  as `pisf simulate` does (tools/rawdata/groundtruth.py);
* writes the file under a temporary name and renames it at the end, so a failed conversion
  leaves no output file.

Masks (`--undersample`, acceleration `--accel R`, centre `--acs N`, `--seed`; made in
tools/rawdata/masks.py): one ky mask per image, the same for every image unless stated:
  equispaced          every R-th line through the centre line + N centre lines (default 24)
  random              round(ny/R) lines in all: the N centre lines + uniformly drawn others
  fastmri             fastMRI's random mask: centre fraction 0.08 at R=4, 0.04 at R=8 (0.32/R
                      otherwise), other lines with probability (ny/R - centre)/(ny - centre)
  fastmri-equispaced  fastMRI's equispaced-fraction mask: the same centre, then lines at the
                      adjusted spacing R (c - ny)/(c R - ny) from a random offset
  cmrxrecon           CMRxRecon 2023 "Uniform": every R-th line + 24 centre lines, fixed over frames
  cmrxrecon-kt        CMRxRecon 2024 "ktUniform": every R-th line, the offset moving by one line per
                      frame (cine phase / mapping weighting), + 16 centre lines
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.rawdata.masks import CONVERSION_KINDS, conversion_mask
from tools.rawdata.groundtruth import not_a_reference
from tools.rawdata.source import SLICE_KEY_FIELDS, ConvertError, Line, Source, file_identity

FORMATS = ("twix", "fastmri", "cmrxrecon", "bart")
MASKS = CONVERSION_KINDS
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HOLES_IN_LINES = 0.01  # more all-coil zero samples than this inside sent lines: 2D-undersampled input


@dataclass
class Undersampling:
    mask: str
    accel: float
    acs: int | None = None
    separate: bool = False
    seed: int = 0


# ----------------------------------------------------------------------------- format detection
def detect_format(path: Path) -> str:
    """The format of `path` from its content (and, for BART, its .cfl/.hdr pair)."""
    if path.suffix in (".cfl", ".hdr") or (not path.exists() and path.with_suffix(".cfl").exists()):
        return "bart"
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(HDF5_SIGNATURE) or head[512:520] == HDF5_SIGNATURE:
        return _hdf5_format(path, matlab=head.startswith(b"MATLAB"))
    if head.startswith(b"MATLAB"):
        raise ConvertError(f"{path}: a MATLAB file older than v7.3 (not HDF5); CMRxRecon files are v7.3 "
                           "(save with -v7.3)")
    from tools.rawdata.readers.twix import looks_like_twix
    if looks_like_twix(path):
        return "twix"
    raise ConvertError(f"{path}: unknown layout: not a Siemens twix file, not HDF5 (fastMRI), not a MATLAB "
                       f"v7.3 file (CMRxRecon), not a BART .cfl/.hdr pair")


def _hdf5_format(path: Path, matlab: bool) -> str:
    import h5py
    from tools.rawdata.readers.cmrxrecon import KSPACE_NAMES

    try:
        with h5py.File(path, "r") as f:
            names = set(f.keys())
            if "kspace" in names and not matlab and isinstance(f["kspace"], h5py.Dataset) \
                    and f["kspace"].ndim == 4 and np.iscomplexobj(np.empty(0, f["kspace"].dtype)):
                return "fastmri"
            if names & set(KSPACE_NAMES) or any(n.startswith("kspace_sub") for n in names):
                return "cmrxrecon"
            if "dataset" in names:
                raise ConvertError(f"{path}: already an ISMRMRD raw file: replay it with `pisf replay {path}`")
    except OSError as exc:
        raise ConvertError(f"{path}: unreadable HDF5 file ({exc})") from None
    raise ConvertError(f"{path}: unknown layout: an HDF5 file with datasets {', '.join(sorted(names)) or 'none'}; "
                       f"expected fastMRI `kspace` + `ismrmrd_header` or CMRxRecon `kspace_full`/`kspace`/`kus`")


def read_source(path: Path, fmt: str | None, options: argparse.Namespace | None = None) -> Source:
    fmt = fmt or detect_format(path)
    if fmt == "twix":
        from tools.rawdata.readers.twix import read_twix_source
        return read_twix_source(path, measurement=getattr(options, "measurement", None))
    if fmt == "fastmri":
        from tools.rawdata.readers.fastmri import read_fastmri_source
        return read_fastmri_source(path)
    if fmt == "cmrxrecon":
        from tools.rawdata.readers.cmrxrecon import read_cmrxrecon_source
        return read_cmrxrecon_source(path, variable=getattr(options, "variable", None),
                                     frames=getattr(options, "frames", None),
                                     oversampling=getattr(options, "oversampling", None))
    if fmt == "bart":
        from tools.rawdata.readers.bart import read_bart_source
        return read_bart_source(path, oversampling=getattr(options, "oversampling", None))
    raise ConvertError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- masks
def ky_mask(kind: str, n: int, centre: int, accel: float, acs: int | None, rng: np.random.Generator,
            frame: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pattern, calibration) boolean masks over n lines whose k-space centre is index `centre`
    (tools/rawdata/masks.conversion_mask), with the converter's one-line errors.

    pattern: the image lines beyond the calibration region; calibration: the fully sampled
    centre. Embedded reference: image lines = pattern | calibration; separate reference: image
    lines = pattern, calibration lines sent on their own.
    """
    if accel < 1:
        raise ConvertError(f"--accel must be >= 1, not {accel}")
    if kind not in MASKS:
        raise ConvertError(f"unknown mask {kind!r}; known: {', '.join(MASKS)}")
    return conversion_mask(kind, n, centre, accel, acs, rng, frame)


# ----------------------------------------------------------------------------- the stream
@dataclass
class Planned:
    line: Line
    calibration_only: bool = False   # a separate reference copy of an image line
    embedded: bool = False           # image line flagged calibration-and-imaging


def _ky_limits(header) -> tuple[int, int, int]:
    enc = header.encoding[0]
    limit = enc.encodingLimits.kspace_encoding_step_1 if enc.encodingLimits is not None else None
    if limit is None:
        ny = int(enc.encodedSpace.matrixSize.y)
        return 0, ny - 1, ny // 2
    return int(limit.minimum), int(limit.maximum), int(limit.center)


def image_lines(source: Source) -> dict[tuple, set[int]]:
    lines: dict[tuple, set[int]] = {}
    for line in source.lines:
        if line.kind == "image":
            lines.setdefault(line.key, set()).add(line.ky)
    return lines


def fully_sampled(source: Source) -> bool:
    if source.holes_in_lines:
        return False
    lo, hi, _ = _ky_limits(source.header)
    wanted = set(range(lo, hi + 1))
    images = image_lines(source)
    return bool(images) and all(wanted <= kys for kys in images.values())


def plan_stream(source: Source, undersampling: Undersampling | None) -> tuple[list[Planned], dict]:
    """The lines to send, in order, and a summary (masks per image, acceleration achieved)."""
    if undersampling is None:
        planned = [Planned(line, calibration_only=line.kind == "reference", embedded=line.calibration)
                   for line in source.lines]
        images = image_lines(source)
        lo, hi, _ = _ky_limits(source.header)
        masks = {key: np.isin(np.arange(lo, hi + 1), sorted(kys)) for key, kys in images.items()}
        return planned, {"masks": masks}
    if not fully_sampled(source):
        raise ConvertError("--undersample needs fully sampled input, and this file is already undersampled "
                           "(some ky lines inside the encoding limits are missing); convert it without --undersample")
    lo, hi, centre = _ky_limits(source.header)
    n = hi - lo + 1
    rng = np.random.default_rng(undersampling.seed)
    frame_counter = SLICE_KEY_FIELDS.index(source.frame_counter)
    kt = undersampling.mask == "cmrxrecon-kt"
    masks: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    shared = None
    for key in image_lines(source):
        if kt:
            masks[key] = ky_mask(undersampling.mask, n, centre - lo, undersampling.accel, undersampling.acs, rng,
                                 frame=key[frame_counter])
        else:
            shared = shared or ky_mask(undersampling.mask, n, centre - lo, undersampling.accel, undersampling.acs, rng)
            masks[key] = shared
    planned: list[Planned] = []
    referenced: set[tuple] = set()
    by_key: dict[tuple, list[Line]] = {}
    for line in source.lines:
        if line.kind == "image":
            by_key.setdefault(line.key, []).append(line)
    for line in source.lines:
        if line.kind != "image":
            planned.append(Planned(line, calibration_only=line.kind == "reference", embedded=line.calibration))
            continue
        pattern, calibration = masks[line.key]
        if undersampling.separate and line.key not in referenced:
            referenced.add(line.key)  # the image's reference lines go first, as a separate reference scan
            same = [other for other in by_key[line.key] if calibration[other.ky - lo]]
            planned.extend(Planned(other, calibration_only=True) for other in same)
        index = line.ky - lo
        if undersampling.separate:
            if pattern[index]:
                planned.append(Planned(line))
        elif pattern[index] or calibration[index]:
            planned.append(Planned(line, embedded=bool(calibration[index])))
    image_masks = {key: (p if undersampling.separate else p | c) for key, (p, c) in masks.items()}
    return planned, {"masks": image_masks, "calibration": {k: c for k, (_, c) in masks.items()}}


def build_acquisitions(planned: list[Planned]):
    """Acquisitions with converter-set flags: calibration, FIRST/LAST_IN_SLICE per image, LAST_IN_MEASUREMENT,
    scan counters 1..N. A generator: data is read line by line."""
    import ismrmrd

    imaging = [i for i, p in enumerate(planned) if p.line.kind == "image" and not p.calibration_only]
    first, last = {}, {}
    for i in imaging:
        first.setdefault(planned[i].line.key, i)
        last[planned[i].line.key] = i
    firsts, lasts = set(first.values()), set(last.values())
    converter_flags = (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
                       ismrmrd.ACQ_FIRST_IN_SLICE, ismrmrd.ACQ_LAST_IN_SLICE, ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    for number, item in enumerate(planned):
        acquisition = item.line.make()
        for flag in converter_flags:
            acquisition.clear_flag(flag)
        if item.calibration_only:
            acquisition.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        elif item.embedded and item.line.kind == "image":
            acquisition.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        if number in firsts:
            acquisition.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
        if number in lasts:
            acquisition.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
        if number == len(planned) - 1:
            acquisition.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
        acquisition.scan_counter = number + 1
        yield acquisition


# ----------------------------------------------------------------------------- ground truth
def reference_images(source: Source) -> dict[tuple, np.ndarray]:
    """The fully sampled reference per image: every noise and image line of the source through the
    zerofill chain's stages up to the recon (prewhitening, oversampling removal, placement, RSS),
    magnitude cropped to the recon matrix as image finishing crops it."""
    import ismrmrd.xsd as xsd

    from gadgets.accumulate import SliceAccumulator
    from gadgets.chain import run_stages
    from gadgets.context import StreamContext
    from gadgets.finish import centre_crop
    from gadgets.items import ReconImage
    from gadgets.noise import NoisePrewhitening
    from gadgets.oversampling import RemoveOversampling
    from gadgets.zerofill import ZeroFilledRecon

    context = StreamContext(xsd.CreateFromDocument(xsd.ToXML(source.header)))
    stages = [NoisePrewhitening(context), RemoveOversampling(context), SliceAccumulator(context),
              ZeroFilledRecon(context)]
    full = [Planned(line) for line in source.lines if line.kind in ("noise", "image")]
    rx, ry, rz = context.encoding.recon_matrix
    images = {}
    for item in run_stages(stages, build_acquisitions(full)):
        if isinstance(item, ReconImage):
            magnitude = np.abs(item.data).astype(np.float32)
            magnitude = centre_crop(magnitude, (rz, ry, rx)) if magnitude.shape[0] > rz else centre_crop(magnitude, (ry, rx))
            images[tuple(item.key)] = magnitude[0] if magnitude.shape[0] == 1 else magnitude
    return images


# ----------------------------------------------------------------------------- writing
def write_acquisitions(path: str, acquisitions, group: str = "dataset", batch: int = 256) -> int:
    """Append acquisitions to `/group/data` as ismrmrd.Dataset.append_acquisition stores them (its
    compound dtype), `batch` at a time (one resize per acquisition is ~10x slower)."""
    import h5py
    from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype

    written = 0
    with h5py.File(path, "a") as f:
        parent = f.require_group(group)
        data = parent["data"] if "data" in parent else parent.create_dataset(
            "data", (0,), maxshape=(None,), dtype=acquisition_dtype, chunks=True)
        pending = []

        def flush():
            nonlocal written
            if not pending:
                return
            block = np.empty((len(pending),), dtype=acquisition_dtype)
            for i, acq in enumerate(pending):
                block[i]["head"] = np.frombuffer(acq.getHead(), dtype=acquisition_header_dtype)[0]
                block[i]["data"] = acq.data.view(np.float32).reshape(-1)
                block[i]["traj"] = acq.traj.view(np.float32).reshape(-1)
            data.resize(written + len(pending), axis=0)
            data[written:written + len(pending)] = block
            written += len(pending)
            pending.clear()

        for acquisition in acquisitions:
            pending.append(acquisition)
            if len(pending) == batch:
                flush()
        flush()
    return written


def write_reference(path: str, images: dict[tuple, np.ndarray], masks: dict[tuple, np.ndarray], attrs: dict) -> None:
    """The fully sampled reference as ground truth ([slice, phase, y, x], tools/rawdata/groundtruth.py), with the
    ky mask of the image lines sent ([slice, phase, ky])."""
    import h5py

    from tools.rawdata.groundtruth import write_groundtruth

    slices = max(k[0] for k in images) + 1
    phases = max(k[2] for k in images) + 1
    shape = next(iter(images.values())).shape
    rss = np.full((slices, phases) + shape, np.nan, dtype=np.float32)
    ny = len(next(iter(masks.values())))
    mask = np.zeros((slices, phases, ny), dtype=np.uint8)
    for key, image in images.items():
        rss[key[0], key[2]] = image
        if key in masks:
            mask[key[0], key[2]] = masks[key]
    with h5py.File(path, "a") as h5:
        write_groundtruth(h5, rss, layout=("rss: [slice, phase, y=phase encode, x=readout] at the recon matrix, "
                                           "fully sampled reference (NaN: no such image); mask: [slice, phase, ky "
                                           "from the encoding-limit minimum] 1 = image line sent"),
                          attrs=attrs, mask=mask)


def set_acceleration(header, undersampling: Undersampling) -> None:
    """The header's parallel imaging: the requested R (the pattern's spacing) and the reference mode."""
    import ismrmrd.xsd as xsd

    enc = header.encoding[0]
    enc.parallelImaging = xsd.parallelImagingType(
        accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=max(1, int(round(undersampling.accel))),
                                                      kspace_encoding_step_2=1),
        calibrationMode=xsd.calibrationModeType.SEPARATE if undersampling.separate else xsd.calibrationModeType.EMBEDDED)


def _check_paths(input_path: Path, out_path: Path) -> None:
    if not input_path.exists() and not (input_path.with_suffix(".cfl").exists()):
        raise ConvertError(f"{input_path}: no such file")
    if input_path.is_dir():
        raise ConvertError(f"{input_path}: is a directory, not a raw file")
    if out_path.exists() and out_path.is_dir():
        raise ConvertError(f"--out {out_path}: is a directory; name the .h5 file to write")
    if out_path.parent.exists() and not out_path.parent.is_dir():
        raise ConvertError(f"--out {out_path}: {out_path.parent} is a file; choose another output path")
    if out_path.exists() and input_path.exists() and out_path.resolve() == input_path.resolve():
        raise ConvertError("--out names the input file; choose another output name")


def _write_file(out_path: Path, header_xml: str, planned: list[Planned], truth: dict | None,
                masks: dict, truth_attrs: dict) -> None:
    """Header, acquisitions and (when given) the ground truth, written under a temporary name
    that is renamed at the end, so a failed conversion leaves no output file."""
    import ismrmrd

    from tools.cli import created_directory

    created_directory(out_path.parent)  # missing directories are made and announced, as every command does

    descriptor, temporary = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp",
                                             dir=str(out_path.parent if str(out_path.parent) else "."))
    os.close(descriptor)
    os.remove(temporary)  # ismrmrd.Dataset creates it
    try:
        dataset = ismrmrd.Dataset(temporary, "dataset", create_if_needed=True)
        try:
            dataset.write_xml_header(header_xml)
        finally:
            dataset.close()
        write_acquisitions(temporary, build_acquisitions(planned))
        if truth is not None:
            write_reference(temporary, truth, masks, attrs=truth_attrs)
        os.replace(temporary, out_path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def convert(input_path: Path | str, out_path: Path | str, fmt: str | None = None,
            undersampling: Undersampling | None = None, options: argparse.Namespace | None = None,
            log=print, warn=None) -> dict:
    """Convert one file; returns a summary. Raises ConvertError on bad input (no output file then)."""
    import ismrmrd.xsd as xsd

    warn = warn or (lambda text: print(f"pisf convert: warning: {text}", file=sys.stderr))
    input_path, out_path = Path(input_path), Path(out_path)
    _check_paths(input_path, out_path)
    start = time.perf_counter()
    source = read_source(input_path, fmt, options)
    if not any(line.kind == "image" for line in source.lines):
        raise ConvertError(f"{input_path}: no imaging lines to convert")
    planned, summary = plan_stream(source, undersampling)
    for text in source.warnings:  # once the input is known to convert: bad input gets one line only
        warn(text)
    header = source.header
    sampled = np.array([m.sum() for m in summary["masks"].values()], dtype=float)
    lo, hi, _ = _ky_limits(header)
    achieved = float((hi - lo + 1) / sampled.mean()) if sampled.size and sampled.mean() > 0 else 1.0
    if undersampling is not None:
        set_acceleration(header, undersampling)
    truth = None
    sampling = source.sampling if source.sampling is not None and source.sampling.holes_in_lines else None
    if sampling is not None:
        achieved = sampling.sample_acceleration   # R from the samples: a 2D mask keeps most lines
    why_no_truth = not_a_reference(header, sampling, source.holes_in_lines)
    if why_no_truth:
        warn(f"no ground truth written: {why_no_truth} (replay prints no metrics)")
    elif not fully_sampled(source):
        warn("the input is not fully sampled: no ground truth written (replay prints no metrics)")
    elif any(k[1] or k[3] or k[4] for k in image_lines(source)):
        warn("images differ in contrast, repetition or set: no ground truth written (its layout is "
             "[slice, phase, y, x])")
    else:
        truth = reference_images(source)
    # no <version>, a DEVICE_SUBJECT_SESSION_MEAS measurement ID and its IDs: what Gadgetron 4.7 accepts
    (source.identity or file_identity(input_path, source.format)).write_into(header)
    header_xml = xsd.ToXML(header)

    counts = {"noise": 0, "reference": 0, "image": 0, "other": 0}
    for item in planned:
        counts["reference" if item.calibration_only else item.line.kind] += 1
    truth_attrs = {
        "source": input_path.name, "format": source.format,
        "undersampling": "none" if undersampling is None else undersampling.mask,
        "accel_requested": 1.0 if undersampling is None else float(undersampling.accel),
        "accel_achieved": achieved,
        "reference_lines": "separate" if undersampling is not None and undersampling.separate else "embedded",
    }
    _write_file(out_path, header_xml, planned, truth, summary["masks"], truth_attrs)
    keys = list(image_lines(source))
    result = dict(path=str(out_path), format=source.format, description=source.description,
                  acquisitions=len(planned), counts=counts, images=len(keys), accel=achieved,
                  groundtruth=truth is not None, seconds=time.perf_counter() - start, header_xml=header_xml)
    if log:
        enc = header.encoding[0]
        slices = len({k[0] for k in keys})
        log(f"{source.description}")
        log(f"wrote {out_path}: {len(planned)} acquisitions ({counts['image']} imaging, {counts['reference']} "
            f"reference-only, {counts['noise']} noise{', ' + str(counts['other']) + ' other' if counts['other'] else ''}), "
            f"{len(keys)} image(s) in {slices} slice(s), "
            f"encoded {enc.encodedSpace.matrixSize.x}x{enc.encodedSpace.matrixSize.y}, recon "
            f"{enc.reconSpace.matrixSize.x}x{enc.reconSpace.matrixSize.y}, R {achieved:.2f}"
            + (f" from the samples (2D undersampled within lines: {100.0 / achieved:.1f} % of the samples; "
               f"{sampling.line_acceleration:.2f} counting lines)" if sampling is not None else "")
            + (f" ({undersampling.mask}, {'separate' if undersampling.separate else 'embedded'} reference)"
               if undersampling else "")
            + ("; fully sampled reference in the ground-truth group" if truth is not None else "")
            + (f"; no ground truth: {why_no_truth}" if why_no_truth else "")
            + f"; {result['seconds']:.1f} s")
    return result


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="raw file: Siemens .dat, fastMRI .h5, CMRxRecon .mat, BART .cfl")
    parser.add_argument("--out", type=Path, required=True, help="ISMRMRD raw file to write (replaced if present)")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: recognised from the content)")
    parser.add_argument("--undersample", choices=MASKS, help="retrospective ky undersampling of fully sampled input")
    parser.add_argument("--accel", type=float, default=4.0, help="acceleration R for --undersample (default 4)")
    parser.add_argument("--acs", type=int, default=None,
                        help="fully sampled centre lines (default: 24; cmrxrecon 24, cmrxrecon-kt 16; "
                             "fastmri masks: the fastMRI centre fraction)")
    parser.add_argument("--reference", choices=("embedded", "separate"), default="embedded",
                        help="centre lines as image lines flagged calibration (default), or as separate "
                             "calibration-only lines sent before each image's lines")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    parser.add_argument("--measurement", type=int, default=None,
                        help="twix: measurement (raid) number, 1-based (default: the last, the image scan)")
    parser.add_argument("--variable", default=None, help="cmrxrecon: the k-space variable (default: the one present)")
    parser.add_argument("--frames", choices=("phase", "set", "contrast", "repetition"), default=None,
                        help="cmrxrecon: counter of the frame axis, cine phases and mapping weightings alike "
                             "(default phase; ground truth is written for phase only)")
    parser.add_argument("--oversampling", type=float, default=None,
                        help="cmrxrecon/bart: readout oversampling factor of the data (default 1)")


def run(args: argparse.Namespace) -> int:
    from tools.cli import CommandError

    undersampling = None
    if args.undersample:
        undersampling = Undersampling(args.undersample, args.accel, args.acs, args.reference == "separate", args.seed)
    elif args.reference == "separate" or args.acs is not None:
        raise CommandError("--reference and --acs apply to --undersample; add --undersample MASK")
    try:
        convert(args.input, args.out, args.format, undersampling, args)
    except ConvertError as exc:
        raise CommandError(_what_to_do(str(exc))) from exc
    except KeyboardInterrupt:
        print("pisf convert: interrupted; no output written", file=sys.stderr)
        return 130
    except (OSError, MemoryError):
        raise  # the command boundary (tools/cli.py) words these
    except Exception as exc:  # a reader tripping over malformed content: still one line (the cause chained)
        raise CommandError(f"{args.input}: cannot convert ({type(exc).__name__}: {exc}); check --format, and "
                           f"report it with the output of PISF_TRACEBACK=1 if the file is sound") from exc
    return 0


def _what_to_do(problem: str) -> str:
    """A reader's message, with what to do added where it has none."""
    if ";" in problem:
        return problem
    if problem.endswith("no such file"):
        return f"{problem}; check the path"
    if "truncated" in problem:
        return f"{problem}; copy the file again (its transfer was cut short)"
    return f"{problem}; see `pisf convert --help` for the formats it reads (--format names one)"

"""BART .cfl/.hdr k-space -> a `Source` for `pisf convert`.

Layout (BART's file format and dimension order, misc/mri.h): the .hdr's second line lists the
dimensions, the .cfl holds complex64 little endian in column-major order. Dimensions 0, 1, 2
are READ, PHS1, PHS2 (space), 3 COIL, 4 MAPS, 5 TE, 10 TIME, 13 SLICE, 14 AVG. Centred FFT
convention (k-space centre at n // 2).

A 2D Cartesian k-space has two non-singleton spatial dimensions: the first is the readout
(BART's READ when present) and the second the phase encode; images [y = phase encode,
x = readout]. TIME -> phase, TE -> contrast, SLICE -> slice, AVG -> repetition. MAPS must be 1;
3D k-space and other dimensions are refused. BART files carry no geometry: axial directions,
1 mm pixels and 5 mm slices are written, with a warning. Input already undersampled (zero lines,
or holes inside lines from 2D masks such as Poisson discs) converts as it is, without ground truth.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gadgets.numerics.sampling import combined
from tools.rawdata.source import ArrayImage, ConvertError, Source, array_lines, default_positions, unit_pixel_header

COUNTERS = {5: 1, 10: 2, 13: 0, 14: 3}  # BART dimension -> index in (slice, contrast, phase, repetition, set)
NAMES = {0: "READ", 1: "PHS1", 2: "PHS2", 3: "COIL", 4: "MAPS", 5: "TE", 10: "TIME", 13: "SLICE", 14: "AVG"}
SLICE_THICKNESS_MM = 5.0


def read_dims(stem: Path) -> list[int]:
    hdr = stem.with_suffix(".hdr")
    cfl = stem.with_suffix(".cfl")
    if not hdr.is_file() or not cfl.is_file():
        raise ConvertError(f"{stem}: a BART file needs both {hdr.name} and {cfl.name}")
    try:
        lines = hdr.read_text(encoding="ascii").splitlines()
        dims = [int(v) for v in lines[1].split()]
    except (UnicodeDecodeError, IndexError, ValueError):
        raise ConvertError(f"{hdr}: not a BART header (second line must list the dimensions)") from None
    if not dims or len(dims) > 16 or min(dims) < 1:
        raise ConvertError(f"{hdr}: not a BART header (dimensions {dims})")
    expected = int(np.prod(dims)) * 8
    if cfl.stat().st_size != expected:
        raise ConvertError(f"{cfl}: {'truncated' if cfl.stat().st_size < expected else 'wrong size'}: "
                           f"dimensions {dims} need {expected} bytes, the file has {cfl.stat().st_size}")
    return dims + [1] * (16 - len(dims))


def read_bart_source(path: Path, oversampling: float | None = None) -> Source:
    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix in (".cfl", ".hdr") else stem
    dims = read_dims(stem)
    oversampling = float(oversampling or 1.0)
    spatial = [d for d in (0, 1, 2) if dims[d] > 1]
    unknown = [d for d in range(16) if dims[d] > 1 and d not in (0, 1, 2, 3) and d not in COUNTERS]
    if len(spatial) != 2 or dims[4] != 1 or unknown:
        described = ", ".join(f"{NAMES.get(d, f'dim {d}')}={dims[d]}" for d in range(16) if dims[d] > 1)
        raise ConvertError(f"{stem}: unknown layout for 2D Cartesian k-space ({described}); expected two spatial "
                           f"dimensions, COIL, and optionally TE, TIME, SLICE, AVG (MAPS = 1)")
    read_dim, phase_dim = spatial
    nx, ny, coils = dims[read_dim], dims[phase_dim], dims[3]
    data = np.memmap(stem.with_suffix(".cfl"), dtype=np.complex64, mode="r", shape=tuple(dims), order="F")
    counters = sorted(COUNTERS)
    grid = [range(dims[d]) for d in counters]
    keys, images = [], []
    slices = dims[13]
    positions = default_positions(slices, SLICE_THICKNESS_MM)
    for values in np.ndindex(*[len(g) for g in grid]):
        key = [0, 0, 0, 0, 0]
        index: list = [0] * 16
        for d, v in zip(counters, values):
            key[COUNTERS[d]] = v
            index[d] = v
        index[read_dim] = index[phase_dim] = index[3] = slice(None)

        def load(index=tuple(index)):
            block = np.asarray(data[index])                          # the remaining axes in order: read, phase, coil
            return np.transpose(block, (2, 1, 0)).astype(np.complex64)  # [coil, phase, read]
        keys.append(tuple(key))
        images.append(ArrayImage(tuple(key), load, positions[key[0]]))
    order = sorted(range(len(keys)), key=lambda i: keys[i])  # slice outer, then the frames
    images = [images[i] for i in order]
    keys = [keys[i] for i in order]
    stats: dict = {}
    lines = array_lines(images, stats=stats)
    header = unit_pixel_header(coils=coils, nx=nx, ny=ny, oversampling=oversampling, slice_mm=SLICE_THICKNESS_MM,
                               keys=keys, system="BART")
    warnings = [f"BART files carry no geometry: axial directions, 1 mm pixels and {SLICE_THICKNESS_MM:g} mm slices "
                f"written (readout = {NAMES[read_dim]}, phase encode = {NAMES[phase_dim]})"]
    source = Source("bart", f"BART k-space {stem.name} {dims[:16]}: readout {NAMES[read_dim]} ({nx}), phase encode "
                    f"{NAMES[phase_dim]} ({ny}), {coils} coil(s), {len(keys)} image(s)", header, lines, warnings)
    source.holes_in_lines = stats.get("zero_samples", 0.0) > 0.01
    source.sampling = combined(stats.get("samplings", []))
    return source

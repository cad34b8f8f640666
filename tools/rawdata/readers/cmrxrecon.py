"""CMRxRecon .mat (MATLAB v7.3, HDF5) -> a `Source` for `pisf convert`.

Layout (the challenges' ChallengeDataFormat documents, 2023 and 2024): multi-coil cine
(cine_sax/cine_lax/cine_lvot.mat) and mapping (T1map/T2map.mat) k-space with MATLAB dimensions
(kx, ky, coil, slice, frame): kx = readout, ky = phase encode, coils compressed to 10, slices
(short axis) or slice groups (long axis views), frames = cine time frames or mapping weightings.
Stored by MATLAB v7.3 as HDF5 with the axes reversed, [frame, slice, coil, ky, kx], complex as
a compound of `real`/`imag`. Variables: `kspace_full` (fully sampled), `kspace_sub04/08/10` (2023,
undersampled), `kus` (2024 validation, undersampled), `kspace` (2025); single-coil files
(`kspace_single_*`, (kx, ky, slice, frame)) convert as one coil. Centred FFT convention (the
challenge's ifft2c: fftshift / ifft2 / ifftshift), k-space centre at index n // 2.

Frames stream as cine phases (counter `phase`) by default, slice by slice and phase by phase;
`--frames set|contrast|repetition` puts them in another counter. The files carry no geometry,
field of view or timing: axial directions, 1 mm pixels, 8 mm slices, a 1000 ms cardiac cycle
are written, with a warning. Undersampled variables convert as they are: zero lines are not
sent, and the fully sampled centre (24 lines in 2023, 16 in 2024) is flagged embedded
calibration.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gadgets.numerics.sampling import combined
from tools.rawdata.source import (ArrayImage, ConvertError, Source, array_lines, default_positions,
                           frame_key, unit_pixel_header)

KSPACE_NAMES = ("kspace_full", "kspace", "kus", "kspace_single_full")
SLICE_THICKNESS_MM = 8.0


def _variable(f, path: Path, wanted: str | None) -> str:
    names = [n for n in f.keys() if not n.startswith("#")]
    if wanted:
        if wanted not in names:
            raise ConvertError(f"{path}: no variable {wanted!r}; the file holds {', '.join(names) or 'none'}")
        return wanted
    for name in KSPACE_NAMES:
        if name in names:
            return name
    candidates = sorted(n for n in names if n.startswith(("kspace_sub", "kspace_single_sub")))
    if candidates:
        return candidates[0]
    raise ConvertError(f"{path}: unknown layout: no CMRxRecon k-space variable ({', '.join(KSPACE_NAMES)}, "
                       f"kspace_subNN); the file holds {', '.join(names) or 'none'}")


def _complex(block: np.ndarray) -> np.ndarray:
    if block.dtype.names:
        if not {"real", "imag"} <= set(block.dtype.names):
            raise ConvertError(f"k-space stored as a compound of {block.dtype.names}, not real/imag")
        return (block["real"] + 1j * block["imag"]).astype(np.complex64)
    return np.asarray(block, dtype=np.complex64)


def read_cmrxrecon_source(path: Path, variable: str | None = None, frames: str | None = None,
                          oversampling: float | None = None) -> Source:
    import h5py

    frames = frames or "phase"
    oversampling = float(oversampling or 1.0)
    with h5py.File(path, "r") as f:
        name = _variable(f, path, variable)
        dataset = f[name]
        if not isinstance(dataset, h5py.Dataset):
            raise ConvertError(f"{path}: {name} is a group, not a k-space array")
        names = dataset.dtype.names or ()
        if not (np.iscomplexobj(np.empty(0, dataset.dtype)) or {"real", "imag"} <= set(names)):
            raise ConvertError(f"{path}: {name} is {dataset.dtype}, not complex k-space (real/imag)")
        shape = tuple(int(v) for v in dataset.shape)
    if len(shape) == 5:
        nframes, slices, coils, ny, nx = shape
        single = False
    elif len(shape) == 4:
        nframes, slices, ny, nx = shape
        coils, single = 1, True
    else:
        raise ConvertError(f"{path}: unknown layout: {name} has {len(shape)} dimensions {shape[::-1]} (MATLAB order); "
                           f"CMRxRecon multi-coil k-space is (kx, ky, coil, slice, frame)")

    def loader(s, t):
        def load():
            with h5py.File(path, "r") as f:
                block = _complex(f[name][t, s])       # [coil, ky, kx] (single coil: [ky, kx])
            return block[None] if single else block
        return load

    keys = [frame_key(s, t, frames) for s in range(slices) for t in range(nframes)]
    positions = default_positions(slices, SLICE_THICKNESS_MM)
    images = [ArrayImage(frame_key(s, t, frames), loader(s, t), positions[s]) for s in range(slices) for t in range(nframes)]
    stats: dict = {}
    lines = array_lines(images, frame_counter=frames, stats=stats)
    header = unit_pixel_header(coils=coils, nx=nx, ny=ny, oversampling=oversampling, slice_mm=SLICE_THICKNESS_MM,
                               keys=keys, system="CMRxRecon")
    warnings = [f"CMRxRecon files carry no geometry: axial directions, 1 mm pixels, {SLICE_THICKNESS_MM:g} mm slices "
                f"and a 1000 ms cardiac cycle written"]
    source = Source("cmrxrecon", f"CMRxRecon {Path(path).stem} `{name}`: {slices} slice(s) x {nframes} frame(s) "
                    f"({frames}), {coils} coil(s), {nx} kx x {ny} ky", header, lines, warnings, frame_counter=frames)
    source.holes_in_lines = stats.get("zero_samples", 0.0) > 0.01
    source.sampling = combined(stats.get("samplings", []))
    return source

"""Reference lines: what they are, where they come from, and how many each use needs.

One definition for the numerics, the stages and the converters (numpy only, no stream knowledge).

Names:
- reference lines: the ky lines a scan measured to calibrate on, flagged
  ACQ_IS_PARALLEL_CALIBRATION (a separate reference scan, interleaved calibration lines: they only
  calibrate) or ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING (embedded ACS: image data as well). The
  stream side keeps them under ISMRMRD's word (KSpaceSlice.calibration / calibration_sampled); here
  and in the slice preparation they are `reference_kspace` [C, ny, nx] (zeros elsewhere) and
  `reference_lines` bool [ny].
- reference block [C, L, nx]: the contiguous run of reference lines through the k-space centre
  (`reference_run`); every calibration (GRAPPA kernels, ESPIRiT maps, coil compression of the
  scan-calibrated model) fits on it. A slice without flagged lines uses the fully sampled centre
  run of its image lines instead (`reference_block`).

Minimum counts. Four uses, four named numbers, kept distinct on purpose: each guards a different
fit, and setting any of them to another's value changes which slices are reconstructed how (the
issue asked for no behaviour change; tests pin the 6 of the classical and PISF messages).
"""
from __future__ import annotations

import numpy as np

# GRAPPA kernel fit (numerics/grappa.py): a kernel spans at most L - 2 lines so that every source
# geometry has two target positions inside the block; below 4 lines not even one source line on
# each side of a target fits.
MIN_GRAPPA_REFERENCE_LINES = 4
# ESPIRiT calibration (numerics/calibration.py), the floor of the classical stages (both methods,
# so a slice gets the same answer whichever classical method a chain or fallback names) and of the
# scan-calibrated PISF model (contract 2): the default 6 x 6 ESPIRiT kernel fits the block; with
# fewer lines the kernel would shrink and the maps coarsen.
MIN_CALIBRATION_REFERENCE_LINES = 6
# Contract 1 (models/CONTRACT.md, pisf_inference.calibration_lines, mirrored by the training
# synthesis): the centre run counts as the ACS block that sets the coil compression when it has at
# least this many lines, otherwise every sampled line does. Part of what the shipped contract-1
# models were trained with, so not a tuning knob.
MIN_ACS_BLOCK_LINES = 4
# Conversion of array input without flags (`pisf convert`, fastMRI and the like): a fully sampled
# centre run at least this long in an undersampled image is flagged calibration-and-imaging;
# shorter runs (a random mask's chance neighbours of the centre) stay plain image lines.
MIN_CONVERTED_REFERENCE_LINES = 8

# where a reference block came from (image comments, descriptions)
FROM_REFERENCE_LINES = "reference lines"
FROM_CENTRE_OF_IMAGE_LINES = "fully sampled centre of the image lines"


def reference_run(lines: np.ndarray) -> np.ndarray:
    """Boolean [ny]: the contiguous run of `lines` through the k-space centre (ny // 2), or the
    longest run when none passes through it (the reference block)."""
    lines = np.asarray(lines, dtype=bool)
    edges = np.diff(np.concatenate([[0], lines.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    run = np.zeros(lines.shape[0], dtype=bool)
    if starts.size == 0:
        return run
    centre = lines.shape[0] // 2
    through = np.flatnonzero((starts <= centre) & (centre < stops))
    pick = through[0] if through.size else int(np.argmax(stops - starts))
    run[starts[pick]:stops[pick]] = True
    return run


def reference_block(kspace: np.ndarray, mask: np.ndarray, reference_kspace: np.ndarray | None = None,
                    reference_lines: np.ndarray | None = None) -> tuple[np.ndarray, int, str]:
    """(reference block [C, L, nx], L, where it came from) of one slice: the run of
    `reference_lines` [ny] in `reference_kspace` [C, ny, nx] when both are given, else the fully
    sampled centre run of the image lines (mask [ny]) in kspace [C, ny, nx]."""
    if reference_kspace is not None and reference_lines is not None:
        run = reference_run(reference_lines)
        return np.asarray(reference_kspace)[:, run], int(run.sum()), FROM_REFERENCE_LINES
    run = reference_run(np.asarray(mask) > 0.5)
    return np.asarray(kspace)[:, run], int(run.sum()), FROM_CENTRE_OF_IMAGE_LINES


def centre_region(block: np.ndarray, lines: int, columns: int) -> np.ndarray:
    """The central (at most) lines x columns of a reference block [C, L, nx]."""
    _, ly, lx = block.shape
    y0, x0 = max(0, (ly - lines) // 2), max(0, (lx - columns) // 2)
    return block[:, y0:y0 + min(lines, ly), x0:x0 + min(columns, lx)]

"""k-space sampling masks along ky: the one home of every mask the tools make (numpy only).

A mask is over n ky lines (index = line); the k-space centre is line n // 2 unless a caller
says otherwise. Building blocks, then one maker per use:

| maker | used by | what |
|---|---|---|
| `conversion_mask` | `pisf convert --undersample` (rawdata/convert.py) | the six kinds of `pisf convert` |
| `simulation_lines` | `pisf simulate` (rawdata/simulate.py) | equispaced / random pattern + ACS block |
| `evaluation_mask`, `separate_mask` | `pisf evaluate` cases (evaluation/datasets.py) | embedded centre / separate reference |
| `fastmri_mask` | served-quality tests | fastMRI's random and equispaced-fraction masks |

The training synthesis (training/synth.py) draws its masks with the torch generator that drives
the rest of a batch (its draws are part of the shipped models' recipe) and builds each row's
centre block with `centre_block` here.

Every maker draws from the numpy Generator it is given, in a fixed order, so a seed gives the
mask it gave before these makers moved here (tests/test_masks.py pins a few).
"""
from __future__ import annotations

import numpy as np

# fastMRI challenge: fraction of the lines in the fully sampled centre at R = 4 and R = 8
FASTMRI_CENTRE_FRACTIONS = {4: 0.08, 8: 0.04}
# `pisf convert`: centre lines of the challenges' masks; other kinds default to 24
CONVERSION_CENTRE_LINES = {"cmrxrecon": 24, "cmrxrecon-kt": 16}
CONVERSION_KINDS = ("equispaced", "random", "fastmri", "fastmri-equispaced", "cmrxrecon", "cmrxrecon-kt")


# ----------------------------------------------------------------------------- building blocks
def centre_block(n: int, count: int, centre: int | None = None) -> np.ndarray:
    """Boolean [n]: `count` contiguous lines starting at centre - count // 2 (centre default
    n // 2), shifted back into the range where they would leave it."""
    centre = n // 2 if centre is None else centre
    block = np.zeros(n, dtype=bool)
    count = max(0, min(int(count), n))
    start = min(max(centre - count // 2, 0), n - count)
    block[start:start + count] = True
    return block


def equispaced_lines(n: int, step: int, centre: int | None = None, offset: int = 0) -> np.ndarray:
    """Boolean [n]: every `step`-th line through line centre + offset (centre default n // 2)."""
    centre = n // 2 if centre is None else centre
    return (np.arange(n) - centre - offset) % step == 0


def random_lines(n: int, candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n]: `count` of the `candidates` (line indices) drawn uniformly without replacement."""
    lines = np.zeros(n, dtype=bool)
    lines[rng.choice(candidates, size=count, replace=False)] = True
    return lines


def fastmri_random_lines(n: int, accel: float, centre_count: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n]: fastMRI's random mask outside a centre of `centre_count` lines: each line with
    probability (n / R - centre) / (n - centre), so that about n / R lines are sampled in all."""
    probability = (n / accel - centre_count) / max(n - centre_count, 1)
    return rng.uniform(size=n) < probability


def fastmri_equispaced_lines(n: int, accel: float, centre_count: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [n]: fastMRI's equispaced-fraction rule: lines at the adjusted spacing
    R (c - n) / (c R - n) from a random offset, so that with the centre of c lines about n / R
    lines are sampled in all (within a line or two)."""
    if centre_count * accel != n:
        spacing = accel * (centre_count - n) / (centre_count * accel - n)
    else:
        spacing = accel
    offset = int(rng.integers(0, max(1, int(round(spacing)))))
    lines = np.zeros(n, dtype=bool)
    lines[np.round(np.arange(offset, n - 1, spacing)).astype(int)] = True
    return lines


# ----------------------------------------------------------------------------- makers
def conversion_mask(kind: str, n: int, centre: int, accel: float, acs: int | None, rng: np.random.Generator,
                    frame: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pattern, calibration) boolean masks of `pisf convert` over n lines whose k-space centre
    is line `centre`; pattern: the image lines beyond the calibration region, calibration: the
    fully sampled centre (`acs` lines; default 24, the challenges' own for cmrxrecon kinds, a
    fraction for fastmri kinds). The kinds are described in tools/rawdata/convert.py."""
    if kind in ("fastmri", "fastmri-equispaced"):
        fraction = FASTMRI_CENTRE_FRACTIONS.get(int(round(accel)), 0.32 / accel) if acs is None else acs / n
        count = int(round(n * fraction))
    else:
        count = CONVERSION_CENTRE_LINES.get(kind, 24) if acs is None else int(acs)
    calibration = centre_block(n, count, centre)
    count = int(calibration.sum())
    step = max(1, int(round(accel)))
    if kind in ("equispaced", "cmrxrecon"):
        pattern = equispaced_lines(n, step, centre)
    elif kind == "cmrxrecon-kt":
        pattern = equispaced_lines(n, step, centre, offset=frame)
    elif kind == "random":
        outside = np.flatnonzero(~calibration)
        pattern = random_lines(n, outside, max(0, min(len(outside), int(round(n / accel)) - count)), rng)
    elif kind == "fastmri":
        pattern = fastmri_random_lines(n, accel, count, rng)
    elif kind == "fastmri-equispaced":
        pattern = fastmri_equispaced_lines(n, accel, count, rng)
    else:
        raise ValueError(f"unknown mask {kind!r}; known: {', '.join(CONVERSION_KINDS)}")
    return pattern, calibration


def simulation_lines(ny: int, accel: int, acs: int, kind: str, ky_max: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(pattern, acs) boolean masks of `pisf simulate` over ky, pattern restricted to
    ky <= ky_max (partial Fourier): equispaced = every R-th line through the centre, random =
    as many lines drawn uniformly from 0..ky_max; acs: `acs` contiguous centre lines."""
    below = np.arange(ny) <= ky_max
    pattern = equispaced_lines(ny, accel) & below
    if kind != "equispaced":
        pattern = random_lines(ny, np.arange(ky_max + 1), int(pattern.sum()), rng)
    return pattern, centre_block(ny, acs)


def evaluation_mask(ny: int, accel: float, kind: str, centre_count: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mask [ny] float32, centre [ny] bool) of an embedded-centre evaluation case: a fully
    sampled centre of `centre_count` lines plus outer lines so that round(ny / R) lines are
    sampled in all. random: exactly that many, drawn uniformly outside the centre. equispaced:
    fastMRI's equispaced-fraction rule, which lands within a line or two."""
    centre = centre_block(ny, centre_count)
    mask = centre.astype(np.float32)
    total = int(round(ny / accel))
    if kind == "random":
        mask[random_lines(ny, np.flatnonzero(~centre), max(0, total - centre_count), rng)] = 1
    elif kind == "equispaced":
        mask[fastmri_equispaced_lines(ny, accel, centre_count, rng)] = 1
    else:
        raise ValueError(kind)
    return mask, centre


def separate_mask(ny: int, accel: int) -> np.ndarray:
    """Pure equispaced image mask [ny] float32: every R-th line, ky = ny // 2 among them."""
    return equispaced_lines(ny, accel).astype(np.float32)


def fastmri_mask(n: int, accel: int, centre_fraction: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Mask [n] float32 with a fully sampled centre of round(n * centre_fraction) lines and outer
    lines such that about n / R lines are sampled in total (fastMRI's random mask and its
    equispaced-fraction variant). The centre starts after (n - c + 1) // 2 lines, fastMRI's
    padding (one line later than centre_block's n // 2 - c // 2 for odd n and even c)."""
    count = int(round(n * centre_fraction))
    mask = centre_block(n, count, centre=(n - count + 1) // 2 + count // 2).astype(np.float32)
    if kind == "random":
        mask[fastmri_random_lines(n, accel, count, rng)] = 1
    elif kind == "equispaced":
        mask[fastmri_equispaced_lines(n, accel, count, rng)] = 1
    else:
        raise ValueError(kind)
    return mask

"""What a buffered k-space holds, from its samples: empty or not, whole lines or holes inside them.

No stream knowledge: arrays in, numbers out. The stages (gadgets/accumulate.py, gadgets/slices.py,
gadgets/zerofill.py) and `pisf convert` decide what to do with them.

Why samples and not lines: a 2D mask (a Poisson disc converted from BART, a random kx-ky pattern)
keeps almost every ky line but only a few samples of each, so counting lines says R 1 where the
data hold one sample in eight. A measured sample is never exactly 0 in practice (noise), so an
exact zero inside a line's measured extent is a sample that was not acquired; zeros outside that
extent (asymmetric echo, lines shorter than the readout) are not holes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Lines count as "holed" when more than this share of the samples inside their measured extent is 0:
# fully sampled lines have none; a Poisson disc at R 8 leaves ~85 % of them empty.
HOLE_FRACTION_LIMIT = 0.02


@dataclass(frozen=True)
class Sampling:
    """The sampling of one k-space [coils, ..., ky, kx] (leading kz axes allowed).

    lines: k-space lines holding at least one non-zero sample; samples: non-zero sample positions
    (any coil); grid: positions of the rows `rows` times the readout extent of the data;
    hole_fraction: share of zero samples between each line's first and last non-zero sample.
    """

    lines: int
    samples: int
    rows: int
    grid: int
    hole_fraction: float

    @property
    def empty(self) -> bool:
        return self.samples == 0

    @property
    def holes_in_lines(self) -> bool:
        """2D undersampling: samples are missing inside the measured lines, not only whole lines."""
        return self.hole_fraction > HOLE_FRACTION_LIMIT

    @property
    def line_acceleration(self) -> float:
        """Rows / measured lines (the 1D convention; blind to holes inside lines)."""
        return self.rows / self.lines if self.lines else float("inf")

    @property
    def sample_acceleration(self) -> float:
        """Grid positions / measured samples: the acceleration the data really have."""
        return self.grid / self.samples if self.samples else float("inf")

    def describe(self) -> str:
        share = 100.0 * self.samples / self.grid if self.grid else 0.0
        return (f"2D undersampling within the lines: {share:.1f} % of the k-space samples measured "
                f"(R {self.sample_acceleration:.2f} from the samples; R {self.line_acceleration:.2f} counting "
                f"lines), {100.0 * self.hole_fraction:.0f} % of the samples inside the measured lines are empty")


def combined(samplings: list[Sampling]) -> Sampling | None:
    """One Sampling for several images (sums; the hole fraction of the most holed image)."""
    if not samplings:
        return None
    return Sampling(sum(s.lines for s in samplings), sum(s.samples for s in samplings),
                    sum(s.rows for s in samplings), sum(s.grid for s in samplings),
                    max(s.hole_fraction for s in samplings))


def filled_samples(kspace: np.ndarray) -> np.ndarray:
    """bool [..., ky, kx]: where any coil (axis 0) holds a non-zero sample."""
    return np.any(kspace != 0, axis=0)


def is_empty(kspace: np.ndarray) -> bool:
    """True when every sample is exactly zero (nothing was measured, or a scanner sent zeros)."""
    return not np.any(kspace)


def sampling_of(kspace: np.ndarray, rows: int | None = None) -> Sampling:
    """The Sampling of k-space [coils, ..., ky, kx]; `rows`: ky rows (times kz planes) the encoding
    allows (default: every row of the array), the denominator of both accelerations."""
    filled = filled_samples(kspace)
    filled = filled.reshape(-1, filled.shape[-1])             # [lines, kx]
    measured = filled.any(axis=1)
    lines = int(measured.sum())
    rows = int(filled.shape[0] if rows is None else rows)
    if lines == 0:
        return Sampling(0, 0, rows, rows * filled.shape[1], 0.0)
    measured_rows = filled[measured]
    first = np.argmax(measured_rows, axis=1)
    last = filled.shape[1] - 1 - np.argmax(measured_rows[:, ::-1], axis=1)
    extents = last - first + 1
    samples = int(measured_rows.sum())
    holes = float(1.0 - samples / float(extents.sum()))
    # the readout extent of the whole data: asymmetric echoes do not count as missing samples
    readout = int(last.max() - first.min() + 1)
    return Sampling(lines, samples, rows, rows * readout, holes)

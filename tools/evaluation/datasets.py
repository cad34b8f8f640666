"""Real fully sampled datasets for 1D-undersampling evaluation, and the evaluation cases.

Every dataset is fully sampled multi-coil Cartesian k-space K[coil, ky, kx] in the project's
centred orthonormal FFT convention (gadgets/numerics/fft.py: image = ifftc(K, axes=(-2, -1))), with
ky = phase encode (axis 1, the undersampled axis) and kx = readout (axis 2, always fully
sampled), plus the reference image = root-sum-of-squares magnitude of the fully sampled coil
images; K is scaled so that the reference's maximum is 1. A dataset whose file is absent is skipped with a printed reason.

| name | file | matrix | what |
|---|---|---|---|
| phantom | phantom_8coil_full.mat | 8 x 256 x 256 | real phantom, coil images given; K = fftc(coil images); PE = axis 1 as before |
| brain16 | brain_16ch_96x96_full_ksp.npy | 16 x 96 x 96 | in-vivo axial brain, (coil, PE, RO) |
| cimax | siemens_cimax_phantom_16ch_twix.dat | 16 x 128 x 128 | Siemens twix (Cima.X, Pulseq FLASH), spherical phantom |
| brain16_4ch | brain_16ch_96x96_full_ksp.npy | 4 x 96 x 96 | brain16 compressed by SVD to 4 virtual channels (opt-in) |
| phantom_4ch | phantom_8coil_full.mat | 4 x 256 x 256 | phantom compressed by SVD to 4 virtual channels (opt-in) |
| brain16_folded | brain_16ch_96x96_full_ksp.npy | 16 x 68 x 96 | brain16 with a 68-line PE field of view (0.78 of the head): folded; R <= 6 (opt-in) |
| phantom_folded | phantom_8coil_full.mat | 8 x 160 x 256 | phantom with a 160-line PE field of view (0.77 of the object): folded (opt-in) |

`pisf evaluate` runs DEFAULT_DATASETS unless others are named (the 39 default cases stay
comparable release to release). The 4-channel sets stand in for a 4-channel head array: a
unitary SVD compression keeps the noise white and the channels smooth linear combinations of the
physical coils. Their reference is the RSS of the 4 compressed coils (the fully sampled truth of
that 4-channel acquisition; the 16-channel RSS would add the compression's own loss, which no
reconstruction of 4-channel data can recover, to every method's error). Their cases are those
of the parent dataset with R <= 4 (a 4-channel array is not run beyond R = channels; the guard
and the few-coil training draw R <= channels), with the parent's random masks, so a case's
numbers differ from the parent's only by the coils.

Cases (`make_cases`), R = ny / (number of sampled image lines), centre lines included (the
fastMRI convention):
* `{equispaced,random}_R{3,4,5,6,8}_embedded`: a fully sampled centre of `centre_lines(ny, R)`
  lines is part of the image mask and is also the calibration region;
* `equispaced_R{2,3,4}_separate`: a pure equispaced image mask (every R-th line, the k-space
  centre line ky = ny//2 sampled, no fully sampled block) plus 24 separate reference lines at
  the centre that are calibration only, never image data.

`undersample(case, K)` gives what a scanner would send: the image lines (K * mask) and the
calibration k-space (K on the reference lines, zeros elsewhere).
"""
from __future__ import annotations

import contextlib
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tools.rawdata.masks import centre_block, evaluation_mask, separate_mask
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

EMBEDDED_ACCELERATIONS = (3, 4, 5, 6, 8)
SEPARATE_ACCELERATIONS = (2, 3, 4)
SEPARATE_REFERENCE_LINES = 24
MAX_CENTRE_LINES = 24
MIN_CENTRE_LINES = 12
MIN_OUTER_LINES = 4
QUICK_CASES = ("equispaced_R4_embedded", "equispaced_R3_separate")


def _fft():
    from gadgets.numerics.fft import fftc, ifftc
    return fftc, ifftc


def rss(coil_images: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over axis 0 in float64 (the runtime's, on complex128 coil images)."""
    from gadgets.numerics.coils import root_sum_of_squares
    return root_sum_of_squares(coil_images.astype(np.complex128))


def normalised(kspace: np.ndarray) -> np.ndarray:
    """K scaled so that the RSS reference's maximum is 1 (a scale only; metrics are
    scale-matched anyway; it keeps every method's and BART's numbers in one range)."""
    return (kspace / reference_from_kspace(kspace).max()).astype(np.complex64)


def reference_from_kspace(kspace: np.ndarray) -> np.ndarray:
    """RSS magnitude [ny, nx] (float64) of the fully sampled coil images of K[C, ny, nx]."""
    _, ifftc = _fft()
    return rss(ifftc(kspace, axes=(-2, -1)))


# ----------------------------------------------------------------------------- datasets
@dataclass(eq=False)
class Dataset:
    name: str
    kspace: np.ndarray                    # complex64 [C, ny, nx], centred orthonormal
    reference: np.ndarray                 # float64 [ny, nx], RSS of the fully sampled coil images
    description: str = ""
    source: str = ""
    max_acceleration: float = 0.0         # > 0: only the cases with R <= this (dataset_cases)
    masks_of: str = ""                    # draw the random masks as this dataset does (default: own name)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.kspace.shape)


def load_phantom(data_dir: Path) -> Dataset:
    """phantom_8coil_full.mat: coil images [8, 256, 256] (h5py, fields real/imag); K = centred
    orthonormal 2D FFT; phase encode = axis 1 (as the previous evaluation and the server test)."""
    path = Path(data_dir) / "phantom_8coil_full.mat"
    fftc, _ = _fft()
    kspace = normalised(fftc(phantom_coil_images(data_dir), axes=(-2, -1)))
    return Dataset("phantom", kspace, reference_from_kspace(kspace),
                   "real phantom, 8 coils, 256x256 (disc with a bar), PE = axis 1", path.name)


def phantom_coil_images(data_dir: Path) -> np.ndarray:
    """Coil images [8, 256, 256] complex64 of phantom_8coil_full.mat, as stored (not normalised)."""
    import h5py
    with h5py.File(Path(data_dir) / "phantom_8coil_full.mat", "r") as f:
        raw = f["data"][()]
    return (raw["real"] + 1j * raw["imag"]).astype(np.complex64)


def load_brain16(data_dir: Path) -> Dataset:
    """brain_16ch_96x96_full_ksp.npy: (coil, PE, RO) with image = fftshift(ifft2(ifftshift(k))).
    Same centring as ours (96 is even); the unnormalised ifft2 is ifftc / sqrt(ny * nx), so
    K = k / sqrt(ny * nx) gives the file's coil images under ifftc (then the common
    normalisation, a global scale). Shown with PE
    vertical, the brain is axial with the midline along PE: PE = anterior-posterior."""
    path = Path(data_dir) / "brain_16ch_96x96_full_ksp.npy"
    k = np.load(path)
    kspace = normalised(k / np.sqrt(k.shape[1] * k.shape[2]))
    return Dataset("brain16", kspace, reference_from_kspace(kspace),
                   "in-vivo axial brain, 16 coils, 96x96, PE = axis 1 (anterior-posterior)", path.name)


def read_twix_kspace(path: Path) -> np.ndarray:
    """Image-scan k-space [C, lines, columns] of the last measurement (raid) of a Siemens twix
    file (VB or VD/VE) read with twixtools; one slice, one average/repetition expected;
    lines placed by their line counter."""
    import twixtools
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        twix = twixtools.read_twix(str(path), verbose=False)
    mdbs = [m for m in twix[-1]["mdb"] if m.is_image_scan()]
    if not mdbs:
        raise ValueError(f"{path}: no image scans in the last measurement")
    for counter in ("Sli", "Par", "Ave", "Rep", "Eco", "Phs", "Set"):
        values = {getattr(m.mdh.Counter, counter) for m in mdbs}
        if len(values) > 1:
            raise ValueError(f"{path}: {len(values)} values of counter {counter}; one 2D image expected")
    coils, columns = mdbs[0].data.shape
    lines = max(m.cLin for m in mdbs) + 1
    kspace = np.zeros((coils, lines, columns), dtype=np.complex64)
    filled = np.zeros(lines, dtype=bool)
    for m in mdbs:
        data = np.asarray(m.data)
        if m.is_flag_set("REFLECT"):
            data = data[:, ::-1]
        kspace[:, m.cLin, :] = data
        filled[m.cLin] = True
    if not filled.all():
        raise ValueError(f"{path}: {int((~filled).sum())} of {lines} lines missing; fully sampled data expected")
    return kspace


def remove_readout_oversampling(kspace: np.ndarray) -> np.ndarray:
    """2x readout oversampling removal: iFFT along readout, keep the centre half, FFT back."""
    fftc, ifftc = _fft()
    nx = kspace.shape[-1]
    image = ifftc(kspace, axes=(-1,))
    return fftc(image[..., nx // 4: nx // 4 + nx // 2], axes=(-1,)).astype(np.complex64)


def load_cimax(data_dir: Path) -> Dataset:
    """siemens_cimax_phantom_16ch_twix.dat: Cima.X twix (Pulseq FLASH), 128 PE lines x 128
    readout samples, 16 coils, fully sampled. The readout is not oversampled (128 samples for a
    256 mm FOV, and the sphere comes out round at 128x128 with a 1:1 aspect); oversampling is
    removed only when the file has twice as many samples as lines. The image is a sphere with a
    flat top (the air-water surface of a partly filled sphere) at the low-ky-index edge."""
    path = Path(data_dir) / "siemens_cimax_phantom_16ch_twix.dat"
    kspace = read_twix_kspace(path)
    if kspace.shape[2] == 2 * kspace.shape[1]:
        kspace = remove_readout_oversampling(kspace)
    kspace = normalised(kspace)
    return Dataset("cimax", kspace, reference_from_kspace(kspace),
                   "Siemens Cima.X spherical phantom, 16 coils, 128x128, twix, PE = axis 1", path.name)


FEW_COILS = 4


def compressed_dataset(parent: Dataset, coils: int) -> Dataset:
    """`parent` compressed by SVD (over every sample of its fully sampled k-space) to `coils`
    virtual channels, renormalised, with its own RSS reference; cases: the parent's with R <= coils."""
    from gadgets.numerics.coils import coil_compression_matrix, compress
    matrix = coil_compression_matrix(parent.kspace, coils)
    kspace = normalised(compress(parent.kspace, matrix))
    return Dataset(f"{parent.name}_{coils}ch", kspace, reference_from_kspace(kspace),
                   f"{parent.description.split(',')[0]}, {parent.shape[0]} coils compressed by SVD to {coils} "
                   "virtual channels; reference = their RSS", parent.source,
                   max_acceleration=float(coils), masks_of=parent.name)


def load_brain16_4ch(data_dir: Path) -> Dataset:
    return compressed_dataset(load_brain16(data_dir), FEW_COILS)


def load_phantom_4ch(data_dir: Path) -> Dataset:
    return compressed_dataset(load_phantom(data_dir), FEW_COILS)


def folded_dataset(parent: Dataset, rows: int, max_acceleration: float = 0.0) -> Dataset:
    """`parent` acquired with a smaller field of view along phase encoding: `rows` lines at the
    same k-space extent (same pixel size), so the object, larger than the new FOV, folds. The
    coil images of such a scan are the parent's wrapped with period `rows` (the DFT of `rows`
    samples of the object's continuous spectrum at spacing 1 / (rows pixels)), which is what is
    computed: sum of the parent's coil images over shifts by `rows`, centred on the parent's
    centre. The reference is the RSS of the folded coil images (the fully sampled truth of that
    acquisition). Cases: those of a dataset with `rows` lines (own random masks), up to
    `max_acceleration` when given (brain16_folded: R <= 6; at R 8 its 68 lines leave 4 centre
    lines, below the calibration floor of the classical chains and of BART's 6 x 6 ecalib kernel)."""
    fftc, ifftc = _fft()
    coil_images = ifftc(parent.kspace.astype(np.complex128), axes=(-2, -1))
    ny = coil_images.shape[1]
    # image row y (centred FOV, index y - ny//2 from the centre) lands on new row (y - ny//2) mod rows
    # counted from the new centre rows // 2
    target = (np.arange(ny) - ny // 2 + rows // 2) % rows
    folded = np.zeros(coil_images.shape[:1] + (rows,) + coil_images.shape[2:], dtype=np.complex128)
    np.add.at(folded, (slice(None), target), coil_images)
    kspace = normalised(fftc(folded, axes=(-2, -1)))
    extent = np.flatnonzero(parent.reference.max(axis=1) > 0.1 * parent.reference.max())
    share = rows / (extent[-1] - extent[0] + 1)
    return Dataset(f"{parent.name}_folded", kspace, reference_from_kspace(kspace),
                   f"{parent.description.split(',')[0]}, phase-encoding FOV {rows} of {ny} lines "
                   f"({share:.2f} of the object's extent): folded; reference = RSS of the folded coil images",
                   parent.source, max_acceleration=max_acceleration)


FOLDED_ROWS = {"brain16": 68, "phantom": 160}       # ~0.78 of the object's extent along PE (87, 208 rows)


def load_brain16_folded(data_dir: Path) -> Dataset:
    return folded_dataset(load_brain16(data_dir), FOLDED_ROWS["brain16"], max_acceleration=6)


def load_phantom_folded(data_dir: Path) -> Dataset:
    return folded_dataset(load_phantom(data_dir), FOLDED_ROWS["phantom"])


DATASETS: dict[str, tuple[str, Callable[[Path], Dataset]]] = {
    "phantom": ("phantom_8coil_full.mat", load_phantom),
    "brain16": ("brain_16ch_96x96_full_ksp.npy", load_brain16),
    "cimax": ("siemens_cimax_phantom_16ch_twix.dat", load_cimax),
    "brain16_4ch": ("brain_16ch_96x96_full_ksp.npy", load_brain16_4ch),
    "phantom_4ch": ("phantom_8coil_full.mat", load_phantom_4ch),
    "brain16_folded": ("brain_16ch_96x96_full_ksp.npy", load_brain16_folded),
    "phantom_folded": ("phantom_8coil_full.mat", load_phantom_folded),
}
DEFAULT_DATASETS = ("phantom", "brain16", "cimax")     # the 39 cases of every release's table


def load_datasets(data_dir: str | Path = DEFAULT_DATA, names=None, log=print) -> list[Dataset]:
    """The named datasets (DEFAULT_DATASETS by default) whose files exist; each missing one is reported."""
    data_dir = Path(data_dir)
    out = []
    for name in names or DEFAULT_DATASETS:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        filename, loader = DATASETS[name]
        if not (data_dir / filename).is_file():
            log(f"skipping dataset {name}: {data_dir / filename} not found")
            continue
        out.append(loader(data_dir))
    return out


# ----------------------------------------------------------------------------- cases
@dataclass(eq=False)
class Case:
    dataset: str
    name: str
    mask: np.ndarray                      # float32 [ny]: the image lines
    reference_lines: np.ndarray           # bool [ny]: the calibration lines
    embedded: bool                        # reference lines are image lines (embedded ACS)
    R: float                              # nominal acceleration
    kind: str = "equispaced"              # equispaced | random
    seed: int = 0
    info: dict = field(default_factory=dict)

    @property
    def ny(self) -> int:
        return int(self.mask.shape[0])

    @property
    def r_achieved(self) -> float:
        """ny / number of sampled image lines (centre included)."""
        return float(self.ny / max(1.0, float(self.mask.sum())))

    @property
    def n_reference(self) -> int:
        return int(self.reference_lines.sum())

    @property
    def layout(self) -> str:
        return "embedded" if self.embedded else "separate"


def centre_lines(ny: int, acceleration: float) -> int:
    """Fully sampled centre lines for an embedded case: min(24, max(12, round(ny / 8))) (24 for
    ny >= 192, 16 at 128, 12 at 96), lowered where needed so that at least MIN_OUTER_LINES
    lines of the round(ny / R) sampled lines lie outside the centre (ny = 96 at R = 8: 8)."""
    base = min(MAX_CENTRE_LINES, max(MIN_CENTRE_LINES, int(round(ny / 8))))
    total = int(round(ny / acceleration))
    return int(max(2, min(base, total - MIN_OUTER_LINES)))


def case_seed(dataset: str, name: str, seed: int = 0) -> int:
    return (zlib.crc32(f"{dataset}/{name}".encode()) + 7919 * seed) % (2 ** 31)


def make_cases(dataset: str, ny: int, quick: bool = False, seed: int = 0,
               embedded_accelerations=EMBEDDED_ACCELERATIONS,
               separate_accelerations=SEPARATE_ACCELERATIONS) -> list[Case]:
    """Every case of one dataset (deterministic: the random draws are seeded by dataset, case
    name and `seed`). quick: only QUICK_CASES."""
    cases = []
    for acceleration in embedded_accelerations:
        for kind in ("equispaced", "random"):
            name = f"{kind}_R{acceleration}_embedded"
            s = case_seed(dataset, name, seed)
            mask, centre = evaluation_mask(ny, acceleration, kind, centre_lines(ny, acceleration),
                                           np.random.default_rng(s))
            cases.append(Case(dataset, name, mask, centre, True, float(acceleration), kind, s,
                              {"centre_lines": int(centre.sum())}))
    for acceleration in separate_accelerations:
        name = f"equispaced_R{acceleration}_separate"
        reference = centre_block(ny, min(SEPARATE_REFERENCE_LINES, ny))
        cases.append(Case(dataset, name, separate_mask(ny, acceleration), reference, False,
                          float(acceleration), "equispaced", 0,
                          {"reference_lines": int(reference.sum())}))
    if quick:
        cases = [c for c in cases if c.name in QUICK_CASES]
    return cases


def dataset_cases(dataset: Dataset, quick: bool = False, seed: int = 0) -> list[Case]:
    """`make_cases` for this dataset: only R <= its max_acceleration, random masks drawn as for
    its masks_of dataset."""
    limit = dataset.max_acceleration or float("inf")
    cases = make_cases(dataset.masks_of or dataset.name, dataset.shape[1], quick, seed,
                       [r for r in EMBEDDED_ACCELERATIONS if r <= limit],
                       [r for r in SEPARATE_ACCELERATIONS if r <= limit])
    for case in cases:
        case.dataset = dataset.name
    return cases


def undersample(case: Case, kspace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image k-space, calibration k-space), both [C, ny, nx] complex64: K * mask (the image
    lines only; separate reference lines are never inserted) and K on the reference lines with
    zeros elsewhere (calibration only)."""
    kspace = np.asarray(kspace, dtype=np.complex64)
    if kspace.shape[1] != case.ny:
        raise ValueError(f"case {case.name} has {case.ny} lines, k-space {kspace.shape[1]}")
    image = kspace * case.mask.astype(np.float32)[None, :, None]
    calibration = np.zeros_like(kspace)
    calibration[:, case.reference_lines, :] = kspace[:, case.reference_lines, :]
    return image.astype(np.complex64), calibration


def sampled_lines(kspace: np.ndarray) -> np.ndarray:
    """Boolean [ny]: lines of K[C, ny, nx] with any non-zero sample (e.g. the reference lines of
    a calibration k-space)."""
    return np.any(np.asarray(kspace) != 0, axis=(0, 2))

"""Ground truth stored beside ISMRMRD raw data, where other clients do not trip on it.

Location: the subgroup `pisf_groundtruth` of the raw data's own group, i.e. `/dataset/pisf_groundtruth`
for the usual group. Every client that streams the file opens that group and reads only `xml`,
`data` and `waveforms` (FIRE's client.py also sends `image_*` groups and reads `configAdditional`);
a second *top-level* group, where ground truth used to be (`/pisf_groundtruth`), makes FIRE's
client refuse the file without `-g`. Readers here still accept that legacy place.

Layout (what `pisf simulate` writes, `pisf replay`/`pisf demo` read; converters of fully sampled data
write at least `rss`):

    rss       float32 [slice, phase, y, x]   root-sum-of-squares magnitude at the recon matrix
                                             (y = phase encode = image rows, x = readout = columns):
                                             what an ideal recon of the scan gives; the simulator's
                                             is the RSS of its noise-free coil images prewhitened
                                             as the chains do (`whitening`, [coil, coil])
    combined  complex64 [slice, phase, y, x] optional: coil-combined complex image
    mask      uint8 [slice, phase, ky]       optional: 1 where a line was acquired
    ...       any other arrays and attributes (described in the group's `layout` attribute)

Files of ismrmrd-tools' generator (`ismrmrd_generate_cartesian_shepp_logan`) carry their own truth beside
the raw data: `phantom` (the object), `csm` and `coil_images` (noise-free, oversampled readout), each an
ISMRMRD NDArray. read_groundtruth() turns them into the same `rss`, by the rule the simulator follows:
the RSS of the noise-free coil images cropped to the recon matrix and prewhitened as the chains do
(gadgets.noise.whitening_matrix of the file's noise readouts; none without them); |phantom| x RSS(csm)
without coil images, |phantom| alone without maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

GROUNDTRUTH_NAME = "pisf_groundtruth"
LEGACY_PATH = "/" + GROUNDTRUTH_NAME
GENERATOR_PHANTOM = "phantom"   # ismrmrd_generate_cartesian_shepp_logan's object, beside `data` and `xml`


def groundtruth_path(group: str = "dataset") -> str:
    """HDF5 path of the ground truth that belongs to the raw data in `group`."""
    return f"/{group.strip('/')}/{GROUNDTRUTH_NAME}"


@dataclass
class GroundTruth:
    rss: np.ndarray                       # [slice, phase, y, x]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    path: str = ""                        # where it was found in the file

    def image(self, slice_index: int, phase: int) -> np.ndarray | None:
        """The reference magnitude for one (slice, phase), or None when out of range."""
        if 0 <= slice_index < self.rss.shape[0] and 0 <= phase < self.rss.shape[1]:
            return self.rss[slice_index, phase]
        return None


def not_a_reference(header, sampling=None, holes_in_lines: bool = False) -> str | None:
    """Why the zero-filled Cartesian image of a converted input is not its ground truth, or None.

    EPI and non-Cartesian headers: a Cartesian FFT of the lines is not the image (the server refuses
    them, gadgets/input_checks.py). Holes inside lines (2D masks): the image is undersampled, whatever
    the line count says. `sampling`: a gadgets.numerics.sampling.Sampling of the images' samples."""
    from gadgets.input_checks import header_kind

    kind = header_kind(header)
    if kind != "cartesian":
        return (f"the input is {'EPI' if kind == 'epi' else f'a {kind} trajectory'}: a Cartesian FFT of its lines "
                f"is not the image")
    if sampling is not None and sampling.holes_in_lines:
        return (f"the input is 2D undersampled within its lines (R {sampling.sample_acceleration:.2f} from the "
                f"samples): its zero-filled image is not a reference")
    if holes_in_lines:
        return "the input is 2D undersampled within its lines: its zero-filled image is not a reference"
    return None


def write_groundtruth(h5: h5py.File, rss: np.ndarray, group: str = "dataset", layout: str | None = None,
                      attrs: dict | None = None, **arrays: np.ndarray) -> str:
    """Write ground truth into an open HDF5 file next to the raw data of `group`; returns its path."""
    rss = np.asarray(rss, dtype=np.float32)
    if rss.ndim != 4:
        raise ValueError(f"rss must be [slice, phase, y, x], got shape {rss.shape}")
    path = groundtruth_path(group)
    if path in h5:
        del h5[path]
    gt = h5.require_group(path)
    gt.create_dataset("rss", data=rss)
    for name, array in arrays.items():
        if array is not None:
            gt.create_dataset(name, data=array)
    gt.attrs["layout"] = layout or "rss: [slice, phase, y=phase encode, x=readout] at the recon matrix"
    for key, value in (attrs or {}).items():
        gt.attrs[key] = value
    return path


def read_groundtruth(path: Path | str, group: str | None = "dataset", arrays: bool = False) -> GroundTruth | None:
    """The ground truth stored with the raw data of `group` (or at the legacy top-level place).

    None when the file holds none. `arrays`: also load every other array of the group.
    """
    candidates = [groundtruth_path(group)] if group else []
    candidates.append(LEGACY_PATH)
    with h5py.File(path, "r") as h5:
        for candidate in candidates:
            gt = h5.get(candidate)
            if not isinstance(gt, h5py.Group) or "rss" not in gt:
                continue
            rss = np.asarray(gt["rss"][()], dtype=np.float32)
            if rss.ndim == 3:   # [slice, y, x]: one phase
                rss = rss[:, None]
            extra = ({name: gt[name][()] for name in gt if name != "rss" and isinstance(gt[name], h5py.Dataset)}
                     if arrays else {})
            return GroundTruth(rss=rss, arrays=extra, attrs=dict(gt.attrs), path=candidate)
    if group:
        return _generator_truth(path, group.strip("/"))
    return None


def _complex_array(node: h5py.Dataset | h5py.Group) -> np.ndarray:
    """An ISMRMRD NDArray as stored by ismrmrd-tools: a dataset of complex (real, imag) compounds or of
    numbers, or a group holding one such `data` dataset."""
    if isinstance(node, h5py.Group):
        node = node["data"]
    values = node[()]
    if values.dtype.names and {"real", "imag"} <= set(values.dtype.names):
        return values["real"].astype(np.float64) + 1j * values["imag"].astype(np.float64)
    return np.asarray(values)


def _generator_truth(path: Path | str, group: str) -> GroundTruth | None:
    """The ground truth of an ismrmrd_generate_cartesian_shepp_logan file (module docstring), or None."""
    from gadgets.noise import whitening_matrix

    with h5py.File(path, "r") as h5:
        raw = h5.get(group)
        if not isinstance(raw, h5py.Group) or GENERATOR_PHANTOM not in raw:
            return None
        phantom = _complex_array(raw[GENERATOR_PHANTOM])
        coil_images = _complex_array(raw["coil_images"]) if "coil_images" in raw else None
        maps = _complex_array(raw["csm"]) if "csm" in raw else None
    ny, nx = phantom.shape[-2:]
    phantom = phantom.reshape(-1, ny, nx)                      # [slice, y, x]
    if coil_images is not None and coil_images.shape[-2] == ny and coil_images.shape[-1] >= nx:
        start = coil_images.shape[-1] // 2 - nx // 2           # the recon FOV: readout oversampling removed
        coils = coil_images[..., start:start + nx].reshape(-1, coil_images.shape[-3], ny, nx)
        noise = _noise_readouts(path, group)
        whitening = whitening_matrix(noise) if noise else None
        if whitening is not None and whitening.shape[0] == coils.shape[1]:
            coils = np.einsum("ij,sjyx->siyx", whitening, coils)
        rss = np.sqrt(np.sum(np.abs(coils) ** 2, axis=1))
        source = "RSS of coil_images" + (", prewhitened with the noise readouts" if whitening is not None else "")
    elif maps is not None and maps.shape[-2:] == (ny, nx):
        rss = np.abs(phantom) * np.sqrt(np.sum(np.abs(maps.reshape(-1, maps.shape[-3], ny, nx)) ** 2, axis=1))
        source = "|phantom| x RSS(csm)"
    else:
        rss, source = np.abs(phantom), "|phantom|"
    return GroundTruth(rss=rss[:, None].astype(np.float32), attrs=dict(source=f"ismrmrd-tools generator: {source}"),
                       path=f"/{group}/{GENERATOR_PHANTOM}")


def _noise_readouts(path: Path | str, group: str) -> list[np.ndarray]:
    """The noise readouts at the start of the raw data (the generator writes them first)."""
    import ismrmrd

    noise = []
    try:
        dataset = ismrmrd.Dataset(str(path), group, create_if_needed=False, mode="r")
    except TypeError:  # ismrmrd < 1.15 has no `mode`
        dataset = ismrmrd.Dataset(str(path), group, create_if_needed=False)
    try:
        for index in range(dataset.number_of_acquisitions()):
            acquisition = dataset.read_acquisition(index)
            if not acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                break
            noise.append(np.array(acquisition.data))
    finally:
        dataset.close()
    return noise

"""Physics-informed ISMRMRD raw-data simulator (`pisf simulate`).

Writes a Cartesian multi-coil, multi-slice (optionally cine) raw file that the inline server can
stream, with the noise-free ground truth stored in the same HDF5 file under
`/dataset/pisf_groundtruth` (inside the raw data's group: see tools/rawdata/groundtruth.py).

The ground truth `rss` is what an ideal recon of this scan gives: the RSS of the noise-free, fully
sampled coil images after the prewhitening every chain applies (gadgets.noise.whitening_matrix of
the file's noise readout), in the chains' units (an image divided by its PISF_ScaleFactor). The
RSS of the unwhitened coil images is not: whitening re-weights the coils (unequal, correlated noise)
and the chains' images differ from it at the rim of the head by several per cent (fully sampled,
noise 0.002: 27.9 dB against it, 57 dB against the whitened RSS through zerofill).

Model, in scanner coordinates (x = readout/LR, y = phase encode/AP, z = slice/HF; mm):
  head phantom (soft-edged tissue fractions) -> per-tissue spin-echo or spoiled-GRE signal
  (+ off-resonance phase and fat chemical-shift displacement) -> smooth background phase
  -> loop-coil sensitivities (Biot-Savart) -> centred orthonormal 2D FFT (gadgets.numerics.fft.fftc)
  -> undersampling along ky -> correlated complex noise (one embedded noise readout first).

Arrays are [.., y, x]: rows = phase encode, columns = readout, as the reconstructed images.
Only numpy, h5py, ismrmrd and the standard library are imported (no torch).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from gadgets.numerics.coils import root_sum_of_squares
from gadgets.noise import whitening_matrix
from gadgets.numerics.fft import fftc, ifftc
from gadgets.wire.validate import ScanIdentity
from tools.rawdata.groundtruth import GROUNDTRUTH_NAME, write_groundtruth
from tools.rawdata.masks import centre_block, simulation_lines

GAMMA_HZ_PER_T = 42.577478e6
FAT_SHIFT_PPM = -3.4
TICK_MS = 2.5  # acquisition_time_stamp unit (ISMRMRD / Siemens)
START_OF_SCAN_TICKS = int(10 * 3600 * 1000 / TICK_MS)  # 10:00:00, ticks since midnight
READOUT_BW_PER_PIXEL_HZ = 390.625  # 5 us dwell at 512 oversampled samples
CARDIAC_RR_MS = 1000.0
GROUNDTRUTH_GROUP = "dataset/" + GROUNDTRUTH_NAME  # HDF5 path of the ground truth in written files
SEQUENCE_DEFAULTS = {  # (TR ms, TE ms, flip deg)
    "se": (2000.0, 80.0, 90.0),
    "gre": (10.0, 4.6, 15.0),
}

# Tissue table, roughly 3 T literature values: PD (relative), T1, T2, T2* (ms), fat?
# Fat tissues get the -3.4 ppm chemical shift (phase in GRE, readout displacement in both).
TISSUES = {
    "fat": (0.90, 380.0, 80.0, 40.0, True),       # scalp / subcutaneous fat
    "bone": (0.05, 1000.0, 1.0, 0.5, False),       # cortical bone: nearly no signal
    "marrow": (0.70, 400.0, 70.0, 35.0, True),     # diploe (fatty marrow)
    "csf": (1.00, 4000.0, 2000.0, 400.0, False),   # subarachnoid CSF, ventricles, sulci
    "gm": (0.80, 1600.0, 95.0, 50.0, False),       # cortex
    "wm": (0.70, 900.0, 75.0, 45.0, False),
    "deep_gm": (0.78, 1400.0, 85.0, 40.0, False),  # caudate / thalamus
    "lesion": (0.85, 1400.0, 180.0, 90.0, False),  # oedema-like WM lesion
}
TISSUE_NAMES = list(TISSUES)


# ----------------------------------------------------------------------------------------
# Phantom geometry
# ----------------------------------------------------------------------------------------
def _soft_ellipse(x, y, cx, cy, a, b, pixel, angle=0.0, radius_of_angle=None):
    """Fraction (0..1) of each pixel inside a (possibly angularly modulated) ellipse.

    Anti-aliased over about one pixel from an approximate signed distance, so edges are not
    pure step functions (partial volume) yet stay sharp.
    """
    c, s = np.cos(angle), np.sin(angle)
    xr = (x - cx) * c + (y - cy) * s
    yr = -(x - cx) * s + (y - cy) * c
    u, v = xr / a, yr / b
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    radius = 1.0 if radius_of_angle is None else radius_of_angle(theta)
    # |grad rho| depends only on the polar angle: distance ~ (rho - r) / |grad rho|
    grad = np.sqrt((np.cos(theta) / a) ** 2 + (np.sin(theta) / b) ** 2)
    return np.clip(0.5 - (rho - radius) / (grad * pixel), 0.0, 1.0)


def _soft_box(x, y, cx, cy, half_w, half_h, pixel):
    distance = np.maximum(np.abs(x - cx) - half_w, np.abs(y - cy) - half_h)
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _paint(fractions, tissue, coverage):
    """Composite `coverage` of `tissue` over what is there (partial volume is kept)."""
    fractions *= 1.0 - coverage
    fractions[TISSUE_NAMES.index(tissue)] += coverage


class HeadPhantom:
    """2D axial head slices of a 3D head; random details (gyri, texture, fields) from a seed.

    Coordinates are normalised: 1.0 = half the recon field of view.
    """

    def __init__(self, rng: np.random.Generator):
        self.gyri_phase = rng.uniform(0, 2 * np.pi, 4)
        # Texture: random 3D plane waves, wavelengths ~ 4-25 % of the half-FOV (mild, smooth).
        n_waves = 24
        direction = rng.standard_normal((n_waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavenumber = 2 * np.pi / rng.uniform(0.04, 0.25, n_waves)
        self.texture_k = direction * wavenumber[:, None]
        self.texture_phase = rng.uniform(0, 2 * np.pi, n_waves)
        self.texture_amp = rng.uniform(0.5, 1.0, n_waves) / np.sqrt(n_waves / 2)
        # B0 inhomogeneity (Hz): low-order polynomial + susceptibility bump near frontal sinus.
        self.b0_poly = rng.normal(0, 8.0, 6)
        # Background phase (rad): low-order polynomial, e.g. eddy currents / transmit phase.
        self.phase_poly = rng.normal(0, 0.6, 6)
        self.phase_offset = rng.uniform(-np.pi, np.pi)

    @staticmethod
    def _poly2(c, x, y, z):
        return c[0] + c[1] * x + c[2] * y + c[3] * z + c[4] * (x * x - y * y) + c[5] * x * y

    def fractions(self, x, y, z, pixel, motion):
        """Tissue fractions [tissue, ny, nx] at normalised coordinates.

        motion in [0, 1]: cine cycle state (0 = rest): bulk AP displacement up to ~2 mm
        (breathing-like) and ventricles expanding by up to 15 % (pulsation).
        """
        pulsation = 1.0 + 0.15 * motion
        y = y - 0.02 * motion
        # Head is an ellipsoid: cross-sections shrink away from z = -0.15
        head_scale = np.sqrt(max(1.0 - ((z + 0.15) / 1.05) ** 2, 0.05))
        xs, ys, px = x / head_scale, y / head_scale, pixel / head_scale
        fr = np.zeros((len(TISSUE_NAMES),) + x.shape)
        g = self.gyri_phase

        def sulci(theta):  # narrow inward notches of the brain surface, rotating with z
            return 1.0 - 0.06 * np.maximum(np.cos(13 * theta + g[0] + 4 * z), 0) ** 6

        def gyri(theta):  # wavy grey/white boundary
            return (1.0 + 0.07 * np.sin(9 * theta + g[1] + 3 * z)
                    + 0.04 * np.sin(14 * theta + g[2] - 5 * z) + 0.02 * np.sin(23 * theta + g[3]))

        for tissue, a, b, shape in (("fat", 0.68, 0.86, None), ("bone", 0.63, 0.81, None),
                                    ("marrow", 0.61, 0.79, None), ("bone", 0.58, 0.76, None),
                                    ("csf", 0.56, 0.74, None), ("gm", 0.535, 0.715, sulci),
                                    ("wm", 0.44, 0.61, gyri)):
            _paint(fr, tissue, _soft_ellipse(xs, ys, 0, 0, a, b, px, radius_of_angle=shape))
        # Interhemispheric fissure, interrupted by the corpus callosum
        for cy, h in ((-0.47, 0.26), (0.49, 0.24)):
            _paint(fr, "csf", _soft_box(xs, ys, 0, cy, 0.008, h, px) * fr[TISSUE_NAMES.index("gm")]
                   + _soft_box(xs, ys, 0, cy, 0.008, h, px) * fr[TISSUE_NAMES.index("wm")])
        # Deep grey matter: present in the lower half of the stack
        deep = np.sqrt(max(1.0 - ((z + 0.05) / 0.2) ** 2, 0.0))
        if deep > 0:
            for side in (-1, 1):
                _paint(fr, "deep_gm", _soft_ellipse(xs, ys, side * 0.11, 0.02, 0.07 * deep, 0.11 * deep, px))
                _paint(fr, "deep_gm", _soft_ellipse(xs, ys, side * 0.10, 0.22, 0.09 * deep, 0.10 * deep, px))
        # Lateral ventricles (butterfly), vanish ~28 mm from the centre of the stack
        vent = np.sqrt(max(1.0 - (z / 0.26) ** 2, 0.0)) * pulsation
        if vent > 0:
            for side in (-1, 1):
                _paint(fr, "csf", _soft_ellipse(xs, ys, side * 0.07, -0.02, 0.045 * vent, 0.24 * vent,
                                                px, angle=side * 0.25))
        # Lesions: spheres seen only in some slices
        for cx, cy, cz, r in ((0.25, -0.25, 0.05, 0.09), (-0.3, 0.3, -0.12, 0.05)):
            r_slice = np.sqrt(max(r * r - (z - cz) ** 2, 0.0))
            if r_slice > 0:
                _paint(fr, "lesion", _soft_ellipse(xs, ys, cx, cy, r_slice, r_slice, px))
        return fr

    def texture(self, x, y, z, motion):
        """Smooth multiplicative texture (unit-ish rms), moving with the anatomy."""
        y = y - 0.02 * motion
        k = self.texture_k
        arg = (k[:, 0, None, None] * x + k[:, 1, None, None] * y + k[:, 2, None, None] * z
               + self.texture_phase[:, None, None])
        return np.tensordot(self.texture_amp, np.cos(arg), axes=1)

    def b0_hz(self, x, y, z):
        sinus = -60.0 * np.exp(-(x ** 2 + (y + 0.8) ** 2) / (2 * 0.15 ** 2) - ((z + 0.3) / 0.2) ** 2)
        return self._poly2(self.b0_poly, x, y, z) + sinus

    def background_phase(self, x, y, z):
        return self.phase_offset + self._poly2(self.phase_poly, x, y, z)


# ----------------------------------------------------------------------------------------
# Signal, coils, noise
# ----------------------------------------------------------------------------------------
def tissue_magnitudes(sequence, tr_ms, te_ms, flip_deg):
    """Steady-state magnitude per tissue; T2 for spin echo, T2* for gradient echo."""
    flip = np.deg2rad(flip_deg)
    out = {}
    for name, (pd, t1, t2, t2s, _) in TISSUES.items():
        e1 = np.exp(-tr_ms / t1)
        if sequence == "se":
            out[name] = pd * (1 - e1) * np.exp(-te_ms / t2)
        else:
            out[name] = pd * np.sin(flip) * (1 - e1) / (1 - np.cos(flip) * e1) * np.exp(-te_ms / t2s)
    return out


def _linear_interpolation_matrix(fine, coarse):
    idx = np.clip(np.searchsorted(coarse, fine) - 1, 0, len(coarse) - 2)
    w = (fine - coarse[idx]) / (coarse[idx + 1] - coarse[idx])
    matrix = np.zeros((len(fine), len(coarse)))
    rows = np.arange(len(fine))
    matrix[rows, idx] = 1 - w
    matrix[rows, idx + 1] = w
    return matrix


def loop_coil_array(coils, fov_mm, rng):
    """Loops on an ellipse 15 mm outside the scalp, in planes tangent to it, centred at z = 0."""
    half = fov_mm / 2
    ax, ay = 0.68 * half + 15.0, 0.86 * half + 15.0
    angle = 2 * np.pi * (np.arange(coils) + 0.5) / coils
    centres = np.stack([ax * np.cos(angle), ay * np.sin(angle), np.zeros(coils)], axis=1)
    normals = np.stack([np.cos(angle) / ax, np.sin(angle) / ay, np.zeros(coils)], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    perimeter = np.pi * (3 * (ax + ay) - np.sqrt((3 * ax + ay) * (ax + 3 * ay)))  # Ramanujan
    # Neighbours overlap slightly (as in real arrays); one coil gets a large loop.
    radius = float(np.clip(0.55 * perimeter / coils, 10.0, 0.3 * fov_mm))
    receiver_phase = rng.uniform(-np.pi, np.pi, coils)
    return centres, normals, radius, receiver_phase


def coil_sensitivities(x_mm, y_mm, z_mm, array, segments=48, wire_mm=3.0):
    """Complex receive sensitivities [coil, ny, nx] from Biot-Savart of each loop.

    Reciprocity: sensitivity ~ (Bx - i By)^* of the field per unit current. Evaluated on a
    grid 4x coarser (the field is smooth) and linearly interpolated; `wire_mm` regularises
    the 1/r^2 singularity near the conductor (a wire of finite thickness).
    """
    centres, normals, radius, receiver_phase = array
    xc = np.linspace(x_mm[0], x_mm[-1], max(len(x_mm) // 4, 8))
    yc = np.linspace(y_mm[0], y_mm[-1], max(len(y_mm) // 4, 8))
    gx, gy = np.meshgrid(xc, yc)
    points = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, z_mm)], axis=1)
    phi = (np.arange(segments) + 0.5) * 2 * np.pi / segments
    zhat = np.array([0.0, 0.0, 1.0])
    wx = _linear_interpolation_matrix(x_mm, xc)
    wy = _linear_interpolation_matrix(y_mm, yc)
    sens = np.empty((len(centres), len(y_mm), len(x_mm)), complex)
    for c, (centre, normal) in enumerate(zip(centres, normals)):
        tangent = np.cross(zhat, normal)
        wire = centre + radius * (np.cos(phi)[:, None] * tangent + np.sin(phi)[:, None] * zhat)
        dl = radius * (2 * np.pi / segments) * (-np.sin(phi)[:, None] * tangent + np.cos(phi)[:, None] * zhat)
        # B(p) = sum_s w_ps dl_s x (p - wire_s) = (W dl) x p - W (dl x wire): two matrix products
        distance2 = (np.sum(points ** 2, axis=1)[:, None] + np.sum(wire ** 2, axis=1)[None]
                     - 2 * points @ wire.T)
        weight = (np.maximum(distance2, 0) + wire_mm ** 2) ** -1.5
        field = np.cross(weight @ dl, points) - weight @ np.cross(dl, wire)
        coarse = (field[:, 0] + 1j * field[:, 1]).reshape(gx.shape)  # (Bx - i By)^*
        sens[c] = wy @ coarse @ wx.T * np.exp(1j * receiver_phase[c])
    return sens


def noise_covariance(coils, noise_std, rng):
    """Hermitian positive-definite coil noise covariance.

    Unequal coil noise levels (rms = noise_std); neighbours on the ring correlate 0.1-0.3,
    next neighbours 0.02-0.08, with small complex phases.
    """
    levels = np.exp(0.25 * rng.standard_normal(coils))
    levels *= noise_std / np.sqrt(np.mean(levels ** 2))
    i, j = np.meshgrid(np.arange(coils), np.arange(coils), indexing="ij")
    ring = np.minimum(np.abs(i - j), coils - np.abs(i - j))
    magnitude = np.where(ring == 1, rng.uniform(0.1, 0.3, (coils, coils)),
                         np.where(ring == 2, rng.uniform(0.02, 0.08, (coils, coils)), 0.0))
    corr = np.triu(magnitude * np.exp(1j * rng.uniform(-0.3, 0.3, (coils, coils))), 1)
    corr = corr + corr.conj().T
    while coils > 1 and np.linalg.eigvalsh(np.eye(coils) + corr).min() < 0.3:
        corr *= 0.8  # keep it well conditioned (only matters for tiny rings)
    return (levels[:, None] * (np.eye(coils) + corr) * levels[None, :]).astype(complex)


def correlated_noise(covariance, shape, rng):
    """Complex Gaussian noise [coil, *shape] with E[n n^H] = covariance."""
    coils = covariance.shape[0]
    white = (rng.standard_normal((coils,) + tuple(shape))
             + 1j * rng.standard_normal((coils,) + tuple(shape))) / np.sqrt(2)
    if not np.any(covariance):
        return np.zeros_like(white)
    chol = np.linalg.cholesky(covariance)
    return np.tensordot(chol, white, axes=1)


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------
def partial_fourier_max(ny, partial_fourier):
    """Highest ky acquired: lines 0 .. ceil(f*ny)-1."""
    return min(int(np.ceil(partial_fourier * ny - 1e-9)), ny) - 1


# ----------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------
def build_header(*, matrix, oversampling, fov_mm, thickness_mm, coils, slices, phases, accel,
                 ky_max, sequence, tr_ms, te_ms, flip_deg, field_t, seed, reference="embedded"):
    nx_enc = matrix * oversampling

    def limit(minimum, maximum, center):
        return xsd.limitType(minimum=minimum, maximum=maximum, center=center)

    encoding = xsd.encodingType(
        trajectory=xsd.trajectoryType.CARTESIAN,
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx_enc, y=matrix, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_mm * oversampling, y=fov_mm, z=thickness_mm)),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=matrix, y=matrix, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_mm, y=fov_mm, z=thickness_mm)),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_0=limit(0, nx_enc - 1, nx_enc // 2),
            kspace_encoding_step_1=limit(0, ky_max, matrix // 2),
            kspace_encoding_step_2=limit(0, 0, 0),
            average=limit(0, 0, 0), slice=limit(0, slices - 1, 0), contrast=limit(0, 0, 0),
            phase=limit(0, phases - 1, 0), repetition=limit(0, 0, 0), set=limit(0, 0, 0),
            segment=limit(0, 0, 0)),
        parallelImaging=xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=accel,
                                                          kspace_encoding_step_2=1),
            calibrationMode=(xsd.calibrationModeType.SEPARATE if reference == "separate"
                             else xsd.calibrationModeType.EMBEDDED)),
    )
    header = xsd.ismrmrdHeader(
        measurementInformation=xsd.measurementInformationType(
            patientPosition=xsd.patientPositionType.HFS, protocolName=f"pisf_sim_{sequence}"),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="PISF", systemModel="simulator", systemFieldStrength_T=field_t,
            relativeReceiverNoiseBandwidth=1.0,  # simulated noise is white over the band
            receiverChannels=coils),
        experimentalConditions=xsd.experimentalConditionsType(
            H1resonanceFrequency_Hz=int(round(GAMMA_HZ_PER_T * field_t))),
        encoding=[encoding],
        sequenceParameters=xsd.sequenceParametersType(
            TR=[tr_ms], TE=[te_ms], flipAngle_deg=[flip_deg],
            sequence_type="SpinEcho" if sequence == "se" else "GradientEcho"),
    )
    # no <version>, a DEVICE_SUBJECT_SESSION_MEAS measurement ID and its IDs: what Gadgetron 4.7 accepts
    simulated_identity(seed).write_into(header)
    return header


def simulated_identity(seed: int) -> ScanIdentity:
    """The simulator is the device, the phantom of this seed the subject, measurement number = seed."""
    return ScanIdentity(device="PISF-SIM", patient=f"PHANTOM-{seed}", study="PISF-SIM", measurement=str(seed))


# ----------------------------------------------------------------------------------------
# Main entry
# ----------------------------------------------------------------------------------------
def simulate(out_path, *, matrix=256, coils=8, accel=4, acs=24, mask="equispaced", slices=1,
             phases=1, oversampling=2, noise=0.02, partial_fourier=1.0, sequence="se", tr=None,
             te=None, flip=None, seed=0, fov=220.0, slice_thickness=5.0, slice_gap=1.0,
             field_strength=3.0, store_sensitivities=False, reference="embedded", verbose=False) -> dict:
    """Simulate and write an ISMRMRD raw file; return what was written (incl. ground truth).

    `noise` is the noise std per coil sample (k-space = image space, orthonormal FFT) relative
    to the brightest tissue (~1). With noise 0 no noise readout is written (a zero covariance
    cannot prewhiten). Acquisition order: noise readout, then slice (outer) / cine phase /
    ky ascending; one line per TR.
    reference "separate": the `acs` centre lines are a separate reference scan, sent first (every
    slice's, ky ascending, ACQ_IS_PARALLEL_CALIBRATION, phase 0; measured at the phase-0 state
    with their own noise) as Siemens sends them; the image lines are the pattern alone, and one
    reference serves every cine phase of its slice. "embedded": ACS lines inside each image.
    """
    if reference not in ("embedded", "separate"):
        raise ValueError("reference must be 'embedded' or 'separate'")
    if reference == "separate" and acs < 1:
        raise ValueError("a separate reference scan needs --acs lines (at least 1)")
    t_start = time.perf_counter()
    scan = ScanSettings.checked(matrix=matrix, coils=coils, accel=accel, acs=acs, mask=mask, slices=slices,
                                phases=phases, oversampling=oversampling, noise=noise,
                                partial_fourier=partial_fourier, sequence=sequence, tr=tr, te=te, flip=flip,
                                seed=seed, fov=fov, slice_thickness=slice_thickness, slice_gap=slice_gap,
                                field_strength=field_strength)
    scene = Scene(scan)
    truth = {"rss": np.zeros((scan.slices, scan.phases, scan.ny, scan.nx), np.float32),
             "combined": np.zeros((scan.slices, scan.phases, scan.ny, scan.nx), np.complex64),
             "mask": np.zeros((scan.slices, scan.phases, scan.ny), np.uint8),
             "sensitivities": np.zeros((scan.slices, scan.coils, scan.ny, scan.nx), np.complex64)}
    lines_per_image = np.zeros((scan.slices, scan.phases), int)

    if os.path.exists(out_path):
        os.remove(out_path)  # Dataset opens in append mode: start from an empty file
    header_xml = xsd.ToXML(build_header(
        matrix=scan.matrix, oversampling=scan.oversampling, fov_mm=scan.fov, thickness_mm=scan.slice_thickness,
        coils=scan.coils, slices=scan.slices, phases=scan.phases, accel=scan.accel, ky_max=scan.ky_max,
        sequence=scan.sequence, tr_ms=scan.tr, te_ms=scan.te, flip_deg=scan.flip, field_t=scan.field_strength,
        seed=scan.seed, reference=reference))
    writer = AcquisitionWriter(scan)
    separate = reference == "separate"
    # The coil weighting of the ground truth: the whitening the chains will learn from the noise
    # readout below (identity without one, as they then skip prewhitening).
    whitening = np.eye(scan.coils, dtype=np.complex64)
    with ismrmrd.Dataset(out_path, "dataset", create_if_needed=True) as dataset:
        dataset.write_xml_header(header_xml)
        if scan.noise > 0:
            noise_scan = correlated_noise(scene.covariance, (scan.nx_enc,), scene.rng_noise).astype(np.complex64)
            dataset.append_acquisition(writer.acquisition(noise_scan, [ismrmrd.ACQ_IS_NOISE_MEASUREMENT]))
            learned = whitening_matrix([noise_scan])
            whitening = learned if learned is not None else whitening
        truth["whitening"] = whitening
        if separate:
            for acq in _separate_reference(scan, scene, writer):
                dataset.append_acquisition(acq)
        for s, z_mm in enumerate(scene.slice_z_mm):
            for p, (kspace, coil_images, obj, sens) in enumerate(scene.slice_images(s, z_mm)):
                if p == 0:
                    truth["sensitivities"][s] = sens[:, :, scene.crop]
                truth["rss"][s, p] = root_sum_of_squares(
                    np.tensordot(whitening, coil_images[:, :, scene.crop], axes=1))
                truth["combined"][s, p] = obj[:, scene.crop]
                pattern, acs_mask = simulation_lines(scan.ny, scan.accel, scan.acs, scan.mask, scan.ky_max,
                                                     scene.rng_mask)
                if separate:     # the centre lines came in the reference scan: image lines = pattern
                    acs_mask = np.zeros_like(acs_mask)
                acquired = np.flatnonzero(pattern | acs_mask)
                truth["mask"][s, p, acquired] = 1
                lines_per_image[s, p] = len(acquired)
                lines = kspace[:, acquired, :] + correlated_noise(scene.covariance, (len(acquired), scan.nx_enc),
                                                                  scene.rng_noise)
                for acq in writer.image_lines(lines.astype(np.complex64), acquired, pattern, acs_mask, s, p, z_mm):
                    dataset.append_acquisition(acq)

    with h5py.File(out_path, "a") as f:
        _write_truth(f, scan, scene, truth, store_sensitivities)
    result = dict(
        path=str(out_path), header_xml=header_xml, rss=truth["rss"], combined=truth["combined"],
        mask=truth["mask"], noise_covariance=scene.covariance, sensitivities=truth["sensitivities"],
        whitening=truth["whitening"],
        slice_position_mm=scene.slice_z_mm, acquisitions=writer.counter, noise_acquisitions=int(scan.noise > 0),
        lines_per_image=lines_per_image, effective_acceleration=float(scan.ny / lines_per_image.mean()),
        file_size_bytes=os.path.getsize(out_path), seconds=time.perf_counter() - t_start)
    if verbose:
        print(f"wrote {out_path}: {writer.counter} acquisitions ({result['noise_acquisitions']} noise), "
              f"{scan.slices} slice(s) x {scan.phases} phase(s), {lines_per_image.mean():.1f} of {scan.ny} lines per "
              f"image (R_eff {result['effective_acceleration']:.2f}), {scan.coils} coils, "
              f"{scan.nx_enc} samples, {result['file_size_bytes'] / 2 ** 20:.1f} MiB, "
              f"{result['seconds']:.1f} s")
    return result


@dataclass
class ScanSettings:
    """The simulated protocol, checked, with sequence defaults filled in and derived sizes."""
    matrix: int
    coils: int
    accel: int
    acs: int
    mask: str
    slices: int
    phases: int
    oversampling: int
    noise: float
    partial_fourier: float
    sequence: str
    tr: float
    te: float
    flip: float
    seed: int
    fov: float
    slice_thickness: float
    slice_gap: float
    field_strength: float
    ny: int = 0
    nx: int = 0
    nx_enc: int = 0
    ky_max: int = 0

    @classmethod
    def checked(cls, *, sequence, mask, matrix, coils, accel, acs, slices, phases, oversampling, noise,
                partial_fourier, tr, te, flip, **rest) -> "ScanSettings":
        sequence = sequence.lower()
        if sequence not in SEQUENCE_DEFAULTS:
            raise ValueError(f"sequence must be one of {sorted(SEQUENCE_DEFAULTS)}")
        if mask not in ("equispaced", "random"):
            raise ValueError("mask must be 'equispaced' or 'random'")
        tr_default, te_default, flip_default = SEQUENCE_DEFAULTS[sequence]
        tr = float(tr_default if tr is None else tr)
        te = float(te_default if te is None else te)
        flip = float(flip_default if flip is None else flip)
        matrix, coils, accel, acs = int(matrix), int(coils), int(accel), int(acs)
        slices, phases, oversampling = int(slices), int(phases), int(oversampling)
        if matrix < 16 or matrix % 2:
            raise ValueError("matrix must be even and >= 16")
        if min(coils, accel, slices, phases, oversampling) < 1 or acs < 0 or noise < 0:
            raise ValueError("coils, accel, slices, phases, oversampling >= 1; acs, noise >= 0")
        if not 0.5 <= partial_fourier <= 1.0:
            raise ValueError("partial Fourier fraction must be in [0.5, 1]")
        ny, nx, nx_enc = matrix, matrix, matrix * oversampling
        ky_max = partial_fourier_max(ny, partial_fourier)
        acs = min(acs, ny)
        if acs and ny // 2 - acs // 2 + acs - 1 > ky_max:
            raise ValueError("partial Fourier would cut the ACS block: raise --partial-fourier")
        return cls(matrix=matrix, coils=coils, accel=accel, acs=acs, mask=mask, slices=slices, phases=phases,
                   oversampling=oversampling, noise=noise, partial_fourier=partial_fourier, sequence=sequence,
                   tr=tr, te=te, flip=flip, ny=ny, nx=nx, nx_enc=nx_enc, ky_max=ky_max, **rest)


class Scene:
    """The object, coils and noise of one simulation, and the coil images of each slice and phase.

    Independent random streams, so e.g. the noise level does not change the anatomy or mask."""

    def __init__(self, scan: ScanSettings):
        self.scan = scan
        seeds = np.random.SeedSequence(scan.seed).spawn(4)
        rng_anatomy, rng_coils, self.rng_noise, self.rng_mask = (np.random.default_rng(s) for s in seeds)
        self.phantom = HeadPhantom(rng_anatomy)
        self.coil_array = loop_coil_array(scan.coils, scan.fov, rng_coils)
        self.covariance = noise_covariance(scan.coils, scan.noise, rng_coils)

        self.pixel_mm = scan.fov / scan.matrix
        self.half_fov = scan.fov / 2
        nx_enc, nx, ny = scan.nx_enc, scan.nx, scan.ny
        self.x_enc_mm = (np.arange(nx_enc) - nx_enc // 2) * self.pixel_mm   # index N//2 is the centre (fftc)
        self.y_mm = (np.arange(ny) - ny // 2) * self.pixel_mm
        self.crop = slice(nx_enc // 2 - nx // 2, nx_enc // 2 - nx // 2 + nx)
        # the object lives in the recon FOV
        self.xn, self.yn = np.meshgrid(self.x_enc_mm[self.crop] / self.half_fov, self.y_mm / self.half_fov)
        slice_spacing = scan.slice_thickness + scan.slice_gap
        self.slice_z_mm = (np.arange(scan.slices) - (scan.slices - 1) / 2) * slice_spacing

        magnitudes = tissue_magnitudes(scan.sequence, scan.tr, scan.te, scan.flip)
        signal_scale = 1.0 / max(magnitudes.values())            # brightest tissue -> 1
        self.fat_hz = FAT_SHIFT_PPM * 1e-6 * GAMMA_HZ_PER_T * scan.field_strength
        fat_shift_px = self.fat_hz / READOUT_BW_PER_PIXEL_HZ     # chemical-shift displacement on x
        kx = np.arange(nx_enc) - nx_enc // 2
        self.fat_shift_ramp = np.exp(-2j * np.pi * kx * fat_shift_px / nx_enc)
        self.is_fat = np.array([TISSUES[t][4] for t in TISSUE_NAMES])
        self.tissue_signal = np.array([magnitudes[t] for t in TISSUE_NAMES]) * signal_scale

    def slice_images(self, s: int, z_mm: float):
        """Per cine phase of slice s: (k-space [C, ny, nx_enc], coil images, object, sensitivities);
        the sensitivities are scaled at phase 0 so that their RSS is ~1 (median) inside the head."""
        scan, phantom = self.scan, self.phantom
        zn = z_mm / self.half_fov
        sens = coil_sensitivities(self.x_enc_mm, self.y_mm, z_mm, self.coil_array)
        b0 = phantom.b0_hz(self.xn, self.yn, zn)
        background = np.exp(1j * phantom.background_phase(self.xn, self.yn, zn))
        for p in range(scan.phases):
            motion = 0.5 * (1 - np.cos(2 * np.pi * p / scan.phases))  # 0 at phase 0, 1 mid-cycle
            fractions = phantom.fractions(self.xn, self.yn, zn, self.pixel_mm / self.half_fov, motion)
            amplitude = 1.0 + 0.06 * phantom.texture(self.xn, self.yn, zn, motion)
            water = np.tensordot(self.tissue_signal * ~self.is_fat, fractions, axes=1) * amplitude
            fat = np.tensordot(self.tissue_signal * self.is_fat, fractions, axes=1) * amplitude
            if scan.sequence == "gre":  # off-resonance phase at TE (spin echo refocuses it)
                water = water * np.exp(2j * np.pi * b0 * scan.te * 1e-3)
                fat = fat * np.exp(2j * np.pi * (b0 + self.fat_hz) * scan.te * 1e-3)
            water_enc = np.zeros((scan.ny, scan.nx_enc), complex)
            fat_enc = np.zeros((scan.ny, scan.nx_enc), complex)
            water_enc[:, self.crop] = water * background
            fat_enc[:, self.crop] = fat * background
            # Fat is encoded at a displaced readout position (chemical-shift artefact)
            obj = water_enc + ifftc(fftc(fat_enc, axes=(-1,)) * self.fat_shift_ramp, axes=(-1,))
            if p == 0:
                support = fractions.sum(axis=0) > 0.5
                sens /= np.median(root_sum_of_squares(sens[:, :, self.crop])[support])
            coil_images = sens * obj
            yield fftc(coil_images, axes=(-2, -1)), coil_images, obj, sens


class AcquisitionWriter:
    """Acquisitions of the simulated scan: one header template, scan counter and time stamps
    advancing one TR per readout, flags and counters per line."""

    def __init__(self, scan: ScanSettings):
        self.scan = scan
        self.counter = 0  # scans so far
        template = ismrmrd.AcquisitionHeader()
        template.version = 1
        template.measurement_uid = scan.seed & 0xFFFFFFFF
        template.number_of_samples = scan.nx_enc
        template.available_channels = scan.coils
        template.active_channels = scan.coils
        template.center_sample = scan.nx_enc // 2
        template.sample_time_us = 1e6 / (READOUT_BW_PER_PIXEL_HZ * scan.nx_enc)
        for c in range(scan.coils):
            template.channel_mask[c // 64] |= 1 << (c % 64)
        template.read_dir[:] = (1.0, 0.0, 0.0)
        template.phase_dir[:] = (0.0, 1.0, 0.0)
        template.slice_dir[:] = (0.0, 0.0, 1.0)
        self.template = template

    def acquisition(self, data, flags, **idx):
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(self.template)
        self.counter += 1
        head.scan_counter = self.counter
        head.acquisition_time_stamp = START_OF_SCAN_TICKS + int(round((self.counter - 1) * self.scan.tr / TICK_MS))
        for flag in flags:
            head.flags |= 1 << (flag - 1)
        for name, value in idx.items():
            setattr(head.idx, name, value)
        acq = ismrmrd.Acquisition(head)
        acq.data[:] = data
        return acq

    def image_lines(self, lines: np.ndarray, acquired: np.ndarray, pattern: np.ndarray, acs_mask: np.ndarray,
                    s: int, p: int, z_mm: float):
        """The acquisitions of one image (lines [C, n, nx_enc] at ky = acquired), ky ascending."""
        scan = self.scan
        for n, ky in enumerate(acquired):
            flags = []
            if acs_mask[ky]:
                flags.append(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING if pattern[ky]
                             else ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            if n == 0:
                flags.append(ismrmrd.ACQ_FIRST_IN_SLICE)
            if n == len(acquired) - 1:
                flags.append(ismrmrd.ACQ_LAST_IN_SLICE)
                if s == scan.slices - 1 and p == scan.phases - 1:
                    flags.append(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
            acq = self.acquisition(lines[:, n, :], flags, kspace_encode_step_1=int(ky), slice=s, phase=p)
            acq.position[:] = (0.0, 0.0, float(z_mm))
            acq.physiology_time_stamp[0] = int(round(p * CARDIAC_RR_MS / scan.phases / TICK_MS))
            yield acq


def _separate_reference(scan: ScanSettings, scene: Scene, writer: AcquisitionWriter):
    """The separate reference scan of every slice: its `acs` centre lines at the phase-0 state,
    with their own noise, ACQ_IS_PARALLEL_CALIBRATION, slice s, phase 0, ky ascending."""
    rows = np.flatnonzero(centre_block(scan.ny, scan.acs))     # the image's ACS block (simulation_lines)
    for s, z_mm in enumerate(scene.slice_z_mm):
        kspace = next(scene.slice_images(s, z_mm))[0]
        lines = kspace[:, rows, :] + correlated_noise(scene.covariance, (len(rows), scan.nx_enc), scene.rng_noise)
        for n, ky in enumerate(rows):
            acq = writer.acquisition(lines[:, n, :].astype(np.complex64), [ismrmrd.ACQ_IS_PARALLEL_CALIBRATION],
                                     kspace_encode_step_1=int(ky), slice=s, phase=0)
            acq.position[:] = (0.0, 0.0, float(z_mm))
            yield acq


def _write_truth(f: h5py.File, scan: ScanSettings, scene: Scene, truth: dict, store_sensitivities: bool) -> None:
    # Inside the raw data's group (/dataset/pisf_groundtruth), so that clients which want a
    # single top-level group (FIRE's client.py) stream the file as it is.
    write_groundtruth(
        f, truth["rss"], group="dataset",
        layout=("rss, combined: [slice, phase, y=phase encode, x=readout] at the recon "
                "matrix; rss = RSS of whitening @ (sensitivities * combined), the noise-free fully "
                "sampled coil images prewhitened as the chains do (whitening: [coil, coil], learned "
                "from the noise readout; identity without one); mask: [slice, phase, ky] 1 = acquired "
                "(pattern or ACS)"),
        attrs=dict(matrix=scan.matrix, coils=scan.coils, accel=scan.accel, acs=scan.acs, mask_type=scan.mask,
                   oversampling=scan.oversampling, noise=scan.noise, partial_fourier=scan.partial_fourier,
                   ky_max=scan.ky_max, sequence=scan.sequence, tr_ms=scan.tr, te_ms=scan.te, flip_deg=scan.flip,
                   seed=scan.seed, fov_mm=scan.fov, slice_thickness_mm=scan.slice_thickness,
                   slice_gap_mm=scan.slice_gap, field_strength_t=scan.field_strength),
        combined=truth["combined"], mask=truth["mask"], noise_covariance=scene.covariance.astype(np.complex64),
        whitening=truth["whitening"],
        slice_position_mm=scene.slice_z_mm,
        sensitivities=truth["sensitivities"] if store_sensitivities else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output ISMRMRD raw file (.h5), overwritten")
    parser.add_argument("--matrix", type=int, default=256, help="recon matrix (square, even, >= 16)")
    parser.add_argument("--coils", type=int, default=8, help="receive coils (loop coils around the head)")
    parser.add_argument("--accel", type=int, default=4, help="undersampling factor R along ky")
    parser.add_argument("--acs", type=int, default=24, help="fully sampled centre lines")
    parser.add_argument("--mask", choices=("equispaced", "random"), default="equispaced",
                        help="undersampling pattern outside the ACS block")
    parser.add_argument("--slices", type=int, default=1, help="slices")
    parser.add_argument("--phases", type=int, default=1, help="cine phases (>1 adds motion)")
    parser.add_argument("--oversampling", type=int, default=2, help="readout oversampling factor")
    parser.add_argument("--noise", type=float, default=0.02,
                        help="noise std per coil sample relative to the brightest tissue")
    parser.add_argument("--partial-fourier", type=float, default=1.0,
                        help="fraction of ky acquired from ky=0 (0.5..1)")
    parser.add_argument("--sequence", choices=tuple(SEQUENCE_DEFAULTS), default="se",
                        help="spin echo or spoiled gradient echo signal equations")
    parser.add_argument("--tr", type=float, default=None, help="ms (default: se 2000, gre 10)")
    parser.add_argument("--te", type=float, default=None, help="ms (default: se 80, gre 4.6)")
    parser.add_argument("--flip", type=float, default=None, help="deg (default: se 90, gre 15)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (anatomy, coils, noise, mask)")
    parser.add_argument("--fov", type=float, default=220.0, help="recon field of view, mm")
    parser.add_argument("--slice-thickness", type=float, default=5.0, help="mm")
    parser.add_argument("--slice-gap", type=float, default=1.0, help="mm")
    parser.add_argument("--field-strength", type=float, default=3.0, help="T")
    parser.add_argument("--reference", choices=("embedded", "separate"), default="embedded",
                        help="ACS lines inside every image (default), or a separate reference scan of "
                             "--acs lines per slice, sent before all image lines and shared by the cine phases")
    parser.add_argument("--store-sensitivities", action="store_true",
                        help="also store the coil sensitivities in the ground-truth group")


def _check(args: argparse.Namespace) -> str | None:
    """The first value that cannot be simulated, as one line (None: all fine)."""
    checks = [
        (args.matrix >= 16 and args.matrix % 2 == 0, f"--matrix {args.matrix}: must be even and at least 16"),
        (args.coils >= 1, f"--coils {args.coils}: must be at least 1"),
        (args.accel >= 1, f"--accel {args.accel}: must be at least 1"),
        (args.acs >= 0, f"--acs {args.acs}: must be 0 or more"),
        (args.slices >= 1, f"--slices {args.slices}: must be at least 1"),
        (args.phases >= 1, f"--phases {args.phases}: must be at least 1"),
        (args.oversampling >= 1, f"--oversampling {args.oversampling}: must be at least 1"),
        (args.noise >= 0 and np.isfinite(args.noise), f"--noise {args.noise}: must be 0 or more"),
        (0.5 <= args.partial_fourier <= 1.0, f"--partial-fourier {args.partial_fourier}: must be in 0.5..1"),
        (args.fov > 0, f"--fov {args.fov}: must be positive"),
        (args.slice_thickness > 0, f"--slice-thickness {args.slice_thickness}: must be positive"),
        (args.slice_gap >= 0, f"--slice-gap {args.slice_gap}: must be 0 or more"),
        (args.field_strength > 0, f"--field-strength {args.field_strength}: must be positive"),
        (args.tr is None or args.tr > 0, f"--tr {args.tr}: must be positive"),
        (args.te is None or args.te >= 0, f"--te {args.te}: must be 0 or more"),
        (args.flip is None or 0 < args.flip <= 180, f"--flip {args.flip}: must be in (0, 180]"),
        (args.matrix * args.matrix * args.oversampling * args.coils * args.slices * args.phases <= 2 ** 31,
         "the raw data would exceed 16 GiB: fewer slices, phases, coils or a smaller matrix"),
    ]
    for fine, message in checks:
        if not fine:
            return message
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        return f"--out {args.out} is a directory; give a file name such as {os.path.join(args.out, 'raw.h5')}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem is None:
        from tools.cli import created_directory

        created_directory(os.path.dirname(args.out) or ".")  # made and announced, as every command writing files does
        try:
            simulate(args.out, matrix=args.matrix, coils=args.coils, accel=args.accel, acs=args.acs,
                     mask=args.mask, slices=args.slices, phases=args.phases, oversampling=args.oversampling,
                     noise=args.noise, partial_fourier=args.partial_fourier, sequence=args.sequence,
                     tr=args.tr, te=args.te, flip=args.flip, seed=args.seed, fov=args.fov,
                     slice_thickness=args.slice_thickness, slice_gap=args.slice_gap,
                     field_strength=args.field_strength, store_sensitivities=args.store_sensitivities,
                     reference=args.reference, verbose=True)
            return 0
        except ValueError as exc:   # combinations checked by simulate() itself (partial Fourier vs ACS)
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot write {args.out}: {exc.strerror or exc}"
    todo = "" if ";" in problem else "; see `pisf simulate --help` for the ranges"
    print(f"pisf simulate: error: {problem}{todo}", file=sys.stderr)
    return 2

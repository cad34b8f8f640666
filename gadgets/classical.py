"""Classical reconstructions beside PISF: the `grappa` and `sense` chains' stages, and the core
that `pisf_recon` uses for its fallback and side-by-side images.

Both calibrate on the slice's reference block (gadgets/numerics/reference.py: the run of
reference lines through the k-space centre, else the fully sampled centre run of the image
lines); slices are prepared (ACS lines as data or not, 3D partitions) by gadgets/slices.py.

- GRAPPA (gadgets/numerics/grappa.py): kernels of 2 x 2 source lines x 5 readout taps per
  source geometry, applied row by row in hybrid space; root-sum-of-squares coil combination.
- SENSE (gadgets/numerics/sense.py): ESPIRiT maps (gadgets/numerics/calibration.py) of the
  virtual coils, Tikhonov-regularised CG-SENSE row by row (`regulariser: l2`), or l1 on Haar
  wavelet coefficients by FISTA (`regulariser: l1`); the image is the coil-combined complex
  image, and its data-consistency residual goes into the meta.
More than `virtual_coils` channels are SVD-compressed on the reference block first.
Slices undersampled within their lines (2D masks, gadgets/numerics/sampling.py) are not row problems:
the sense stage solves them as one 2D CG-SENSE problem (gadgets/numerics/sense_2d.py), GRAPPA refuses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .context import InputError, StreamContext
from .items import KSpaceSlice, Notice, ReconImage
from .numerics.calibration import (ESPIRIT_CROP_FROM_ACCELERATION, FEW_COILS_CROP_LEVEL, FEW_COILS_CROP_MAX_COILS,
                                   compressed_calibration, cropped_maps, espirit_crop_level,
                                   sense_calibration_options)
from .numerics.coils import coil_compression_matrix, compress, root_sum_of_squares
from .numerics.fft import ifftc
from .numerics.grappa import DEFAULT_KX_TAPS, DEFAULT_KY_SOURCES, grappa_fill, grappa_weakness
from .numerics.quality import coil_residual
from .numerics.reference import MIN_CALIBRATION_REFERENCE_LINES, centre_region
from .numerics.regularisation import choose_lambda
from .numerics.sampling import sampling_of
from .numerics.sense import coil_images, combine_maps, sense_l1_wavelet, sense_tikhonov
from .numerics.sense_2d import sense_2d
from .reference_prep import CalibrationRecipe, declare_recipe, prepared_calibration
from .slices import SliceData, acs_as_data_default, partitions, slice_data

METHODS = ("grappa", "sense")
CHOICES = METHODS + ("classical",)      # classical: GRAPPA or SENSE per slice geometry (choose_method)
DEFAULT_GRAPPA_LAMBDA = 1e-2
DEFAULT_SENSE_LAMBDA = "auto"              # per scan (numerics/regularisation.py); a number: fixed
FIXED_SENSE_LAMBDA = 1e-2                 # the fixed default before automatic regularisation
DEFAULT_SENSE_ITERATIONS = 30
DEFAULT_SENSE_L1_LAMBDA = "auto"         # per scan (`sense_l1_lambda`); a number: fixed, x max |A^H y|
FIXED_SENSE_L1_LAMBDA = 2e-3              # the best single value on the dev cases (1e-3: -0.07 dB mean)
# automatic l1 lambda: the scan's automatic l2 lambda clipped to this range. Measured per dev case
# (l1 oracle over 2.5e-4..1.6e-2): embedded scans (l2 auto >= 0.0075) peak at 1e-3..4e-3 (2e-3
# within 0.5 dB of the peak in most), the well-conditioned separate-reference R 2 scans (l2 auto
# 1e-4..8e-4) at 2.5e-4, where 2e-3 lost 1.1 (brain) and 0.4 dB (Cima.X).
L1_LAMBDA_RANGE = (2.5e-4, 2e-3)
L1_SEPARATE_FACTOR = 4.0     # times the clipped lambda on separate-reference R >= 3-4 (`l1_lambda_factor`)
DEFAULT_SENSE_L1_ITERATIONS = 60
REGULARISERS = ("l2", "l1")
DEFAULT_VIRTUAL_COILS = 16
# ESPIRiT calibration region of the sense chain: at most this many central reference lines and
# readout samples (the cost grows with patches x (coils k^2)^2; on the 14-channel Siemens slice
# with 49 reference lines x 192 samples the full block took 4 s, as long as BART's whole recon).
# On the real datasets the cropped maps gave the same SENSE PSNR within 0.1 dB (brain R8 0.4 dB).
SENSE_CALIBRATION_REGION = (32, 64)
SERIES = {"zero-filled": 1, "grappa": 3, "sense": 4, "classical": 5}      # pisf is 2
NAMES = {"grappa": "GRAPPA", "sense": "SENSE", "zero-filled": "zero-filled"}


@dataclass
class ClassicalImage:
    """A classical reconstruction of one 2D slice."""
    method: str                          # grappa | sense | zero-filled
    magnitude: np.ndarray                # float32 [ny, nx]
    description: str                     # for the image comment
    meta: dict = field(default_factory=dict)
    image: np.ndarray | None = None      # complex coil-combined image (SENSE)
    note: str | None = None              # why the requested method could not run


@dataclass
class ClassicalOptions:
    grappa_lambda: float = DEFAULT_GRAPPA_LAMBDA
    ky_sources: int = DEFAULT_KY_SOURCES
    kx_taps: int = DEFAULT_KX_TAPS
    sense_lambda: float | str = DEFAULT_SENSE_LAMBDA     # "auto" or a number
    sense_iterations: int = DEFAULT_SENSE_ITERATIONS
    sense_regulariser: str = "l2"
    sense_l1_lambda: float | str = DEFAULT_SENSE_L1_LAMBDA     # "auto" or a number
    sense_l1_iterations: int = DEFAULT_SENSE_L1_ITERATIONS
    virtual_coils: int = DEFAULT_VIRTUAL_COILS
    espirit_crop: str = "auto"          # auto: `espirit_crop_level`'s rule per image; off: never crop


def reconstruct_classical(data: SliceData, method: str, options: ClassicalOptions | None = None,
                          maps: tuple[np.ndarray, ...] | None = None) -> ClassicalImage:
    """GRAPPA or SENSE image of one slice; zero-filled (with a note saying why) when the slice
    has too few reference lines to calibrate. maps: (compression matrix, ESPIRiT maps[, eigenvalue
    maps]) already computed by `compressed_calibration` on this slice's reference block (SENSE reuses
    them, uncropped: the eigenvalue crop is this slice's, by its R; without eigenvalues, no crop)."""
    if method not in CHOICES:
        raise ValueError(f"classical method {method!r}; known: {', '.join(CHOICES)}")
    options = options or ClassicalOptions()
    if method == "classical":
        chosen, why = choose_method(data, options)
        result = reconstruct_classical(data, chosen, options, maps=maps if chosen == "sense" else None)
        if result.method != "zero-filled":
            result.meta["PISF_MethodChoice"] = f"{result.meta['PISF_Method']}: {why}"
            result.description = f"{result.description}; chosen: {why}"
        return result
    started = time.perf_counter()
    block, lines, source = data.reference_block()
    meta = {"PISF_Acceleration": f"{data.acceleration:.2f}", "PISF_ReferenceLines": str(lines)}
    if lines < MIN_CALIBRATION_REFERENCE_LINES:   # one floor for both methods (numerics/reference.py)
        image = root_sum_of_squares(ifftc(data.kspace * data.mask[None, :, None], axes=(-2, -1)))
        note = (f"{NAMES[method]} needs at least {MIN_CALIBRATION_REFERENCE_LINES} contiguous reference lines to "
                f"calibrate; the slice has {lines}: zero-filled image")
        meta.update({"PISF_Method": "zero-filled", "PISF_ReconMs": f"{(time.perf_counter() - started) * 1e3:.1f}"})
        return ClassicalImage("zero-filled", image.astype(np.float32), "zero-filled FFT, RSS coil combination",
                              meta, note=note)
    if method == "grappa":
        matrix = coil_compression_matrix(block, min(data.coils, options.virtual_coils))
        fill = grappa_fill(compress(data.kspace, matrix), data.mask, compress(block, matrix),
                           ky_sources=options.ky_sources, kx_taps=options.kx_taps, lam=options.grappa_lambda)
        magnitude = root_sum_of_squares(ifftc(fill.hybrid, axes=(1,)))
        description = (f"GRAPPA ({2 * options.ky_sources}x{options.kx_taps} kernels, {fill.geometries} "
                       f"geometries, {lines} {source})")
        meta.update({"PISF_Method": "GRAPPA", "PISF_VirtualCoils": str(matrix.shape[0]),
                     "PISF_GrappaLinesSynthesised": str(int(fill.synthesised.sum()))})
        result = ClassicalImage("grappa", magnitude.astype(np.float32), description, meta)
    else:
        matrix, coil_maps, *eigenvalues = maps if maps is not None else compressed_calibration(
            centre_region(block, *SENSE_CALIBRATION_REGION), data.kspace.shape[1:], options.virtual_coils,
            **sense_calibration_options(lines))    # two ESPIRiT maps where the object folds
        coil_maps, crop = espirit_crop(coil_maps, eigenvalues[0] if eigenvalues else None, data.acceleration,
                                       options.espirit_crop, data.coils, not reference_is_data(data))
        meta["PISF_EspiritCrop"] = crop
        measured = compress(data.kspace * data.mask[None, :, None], matrix)
        hybrid = ifftc(measured, axes=(-1,))
        if options.sense_regulariser == "l1":
            lam, chosen_by = sense_l1_lambda(hybrid, data.mask, coil_maps, options.sense_l1_lambda,
                                             l1_lambda_factor(data.coils, data.acceleration, not reference_is_data(data)))
            image = sense_l1_wavelet(hybrid, data.mask, coil_maps, lam=lam, iterations=options.sense_l1_iterations,
                                     per_map=True)
            description = (f"SENSE-l1 (ESPIRiT maps, Haar wavelets, FISTA, lambda {lam:.3g} {chosen_by}, "
                           f"{lines} {source})")
        else:
            lam, chosen_by = sense_lambda(hybrid, data.mask, coil_maps, options.sense_lambda)
            image = sense_tikhonov(hybrid, data.mask, coil_maps, lam=lam, iterations=options.sense_iterations,
                                   per_map=True)
            description = f"SENSE (ESPIRiT maps, CG, lambda {lam:.3g} {chosen_by}, {lines} {source})"
        meta.update({"PISF_Lambda": f"{lam:.4g}", "PISF_LambdaChoice": chosen_by})
        meta.update({"PISF_Method": "SENSE-l1" if options.sense_regulariser == "l1" else "SENSE",
                     "PISF_VirtualCoils": str(matrix.shape[0]),
                     "PISF_EspiritMaps": str(coil_maps.shape[0] if coil_maps.ndim == 4 else 1),
                     "PISF_DataConsistency": f"{coil_residual(coil_images(image, coil_maps), measured, data.mask):.4f}"})
        image = combine_maps(image)                 # two maps: RSS over the maps' images
        result = ClassicalImage("sense", np.abs(image).astype(np.float32), description, meta, image=image)
    meta["PISF_ReconMs"] = f"{(time.perf_counter() - started) * 1e3:.1f}"
    return result


def espirit_crop(maps: np.ndarray, eigenvalues: np.ndarray | None, acceleration: float,
                 setting: str, coils: int | None = None,
                 separate_reference: bool = False) -> tuple[np.ndarray, str]:
    """(maps for this slice's SENSE, what the meta says): the maps zeroed where their eigenvalue is
    at or below `espirit_crop_level` (one map, R >= 4; <= 8 coils with a separate reference, R >= 3,
    at 0.95: measurements in numerics/calibration.py), a
    copy, so a cached calibration serves each image uncropped; setting "off": never."""
    if setting not in ("auto", "off"):
        raise ValueError(f"espirit_crop must be auto or off, not {setting!r}")
    if setting == "off":
        return maps, "none (off)"
    if eigenvalues is None:
        return maps, "none (no eigenvalue map)"
    level = espirit_crop_level(maps, acceleration, coils, separate_reference)
    if level <= 0:
        why = "two maps" if maps.ndim == 4 else f"R {acceleration:.2f} below {ESPIRIT_CROP_FROM_ACCELERATION:g}"
        return maps, f"none ({why})"
    if level == FEW_COILS_CROP_LEVEL and separate_reference:
        return (cropped_maps(maps, eigenvalues, level),
                f"{level:g} ({coils} coils, separate reference, R {acceleration:.2f})")
    return cropped_maps(maps, eigenvalues, level), f"{level:g} (one map, R {acceleration:.2f})"


def reference_is_data(data: SliceData) -> bool:
    """The slice's reference lines are among its image lines (embedded ACS, or no reference lines:
    the fully sampled centre of the image lines), not a separate reference that only calibrates."""
    if not data.has_reference_lines():
        return True
    return bool(np.all(data.mask[np.asarray(data.reference_lines, dtype=bool)] > 0.5))


def choose_method(data: SliceData, options: ClassicalOptions) -> tuple[str, str]:
    """(grappa | sense, why) for one slice: the `classical` chain's rule, measured on the dev
    cases (README "Classical chains vs BART"): SENSE-l1 when the l1 regulariser is asked for;
    SENSE where GRAPPA is weak by geometry (`grappa_weakness`: an irregular mask, too few coils
    for the gap between the outer lines, more needed with an embedded centre); GRAPPA on regular
    patterns with coils to spare, where its kernels, calibrated on this scan's own reference
    lines, beat SENSE's maps (most with a separate reference: the image lines have no centre)."""
    if options.sense_regulariser == "l1":
        return "sense", "l1 regulariser asked for"
    weak = grappa_weakness_of(data, options.virtual_coils)
    if weak:
        return "sense", f"GRAPPA weak here ({weak})"
    return "grappa", "regular line pattern with coils to spare"


def grappa_weakness_of(data: SliceData, virtual_coils: int) -> str | None:
    """`grappa_weakness` of one slice as GRAPPA would see it (its virtual coils, its reference layout)."""
    return grappa_weakness(data.mask, min(data.coils, virtual_coils), reference_is_data(data))


def sense_lambda(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray, setting: float | str) -> tuple[float, str]:
    """(Tikhonov lambda, how it was chosen: "fixed" or "auto (RULE)", RULE: corner, gcv or shoulder,
    gadgets/numerics/regularisation.py) for one slice."""
    if isinstance(setting, str):
        choice = choose_lambda(hybrid, mask, maps)
        return choice.lam, f"auto ({choice.rule})"
    return float(setting), "fixed"


def sense_l1_lambda(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray, setting: float | str,
                    factor: float = 1.0) -> tuple[float, str]:
    """(l1 lambda, how it was chosen) for one slice: a number as given, or "auto": the slice's
    automatic l2 lambda clipped to L1_LAMBDA_RANGE, times `factor` (`l1_lambda_factor`)."""
    if isinstance(setting, str):
        choice = choose_lambda(hybrid, mask, maps)
        low, high = L1_LAMBDA_RANGE
        scaled = f" x{factor:g}" if factor != 1 else ""
        return (float(np.clip(choice.lam, low, high)) * factor,
                f"auto (l2 {choice.rule} {choice.lam:.3g}, clipped{scaled})")
    return float(setting), "fixed"


def l1_lambda_factor(coils: int, acceleration: float, separate_reference: bool) -> float:
    """L1_SEPARATE_FACTOR on separate-reference slices from R 3.5, or from R 2.5 with at most
    FEW_COILS_CROP_MAX_COILS coils (where the 0.95 crop applies), else 1. Measured (sense_l1 vs tuned
    BART l1, x1 -> x4, runs/eval18_fix -> eval18_fix2): R 4 brain16 +0.30 -> +0.54, cimax -1.72 -> -1.31, phantom
    -1.68 -> -0.06, brain16_4ch -5.59 -> -4.68, phantom_4ch -2.52 -> -0.26; R 3 with <= 8 coils
    phantom -1.55 -> -1.37, brain16_4ch -0.36 -> +0.66, phantom_4ch -0.94 -> -0.58; R 3 cimax (16
    coils) lost 1.0 (-0.91 -> -1.92): excluded; x10 lost on phantom R 3-4."""
    if not separate_reference:
        return 1.0
    if acceleration >= 3.5 or (coils <= FEW_COILS_CROP_MAX_COILS and acceleration >= 2.5):
        return L1_SEPARATE_FACTOR
    return 1.0


def lambda_setting(value) -> float | str:
    """A stage's `regularisation` value: "auto" or a positive number (one clear error otherwise)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"regularisation must be 'auto' or a number, not {value!r}") from None
    if not number > 0:
        raise ValueError(f"regularisation must be 'auto' or a positive number, not {value!r}")
    return number


def crop_setting(value) -> str:
    """A stage's `espirit_crop` value: auto (or true) or off (or false; YAML reads a bare off as false)."""
    if value is True or str(value).strip().lower() == "auto":
        return "auto"
    if value is False or str(value).strip().lower() == "off":
        return "off"
    raise ValueError(f"espirit_crop must be auto or off, not {value!r}")


def classical_options(lam: float | str | None, method: str, **options) -> ClassicalOptions:
    """ClassicalOptions from stage parameters (`lam` applies to the stage's own method and
    regulariser)."""
    out = ClassicalOptions(**options)
    if out.sense_regulariser not in REGULARISERS:
        raise ValueError(f"regulariser must be one of {', '.join(REGULARISERS)}, not {out.sense_regulariser!r}")
    if lam is not None:
        lam = lambda_setting(lam)
        if lam == "auto" and method == "grappa":
            lam = None                    # automatic: SENSE only; GRAPPA keeps its default
        if lam is None:
            pass
        elif method == "grappa":
            out.grappa_lambda = float(lam)
        elif out.sense_regulariser == "l1":
            out.sense_l1_lambda = lam
        else:
            out.sense_lambda = lam
    return out


class ClassicalRecon:
    """KSpaceSlice -> ReconImage with GRAPPA or SENSE (the `grappa` and `sense` chains)."""

    method = "grappa"

    def __init__(self, context: StreamContext, regularisation: float | None = None,
                 virtual_coils: int = DEFAULT_VIRTUAL_COILS, acs_as_data: str | bool = "auto",
                 iterations: int | None = None, ky_sources: int = DEFAULT_KY_SOURCES,
                 kx_taps: int = DEFAULT_KX_TAPS, regulariser: str = "l2", espirit_crop: str | bool = "auto"):
        self.context = context
        self.acs_as_data = acs_as_data_default(context, acs_as_data)
        counts = {}
        if iterations is not None:
            counts["sense_l1_iterations" if regulariser == "l1" else "sense_iterations"] = int(iterations)
        self.options = classical_options(regularisation, self.method, virtual_coils=int(virtual_coils),
                                         ky_sources=int(ky_sources), kx_taps=int(kx_taps),
                                         sense_regulariser=str(regulariser),
                                         espirit_crop=crop_setting(espirit_crop), **counts)
        self.noted: set[str] = set()
        # the sense calibration (reconstruct_classical's): a reference_prep stage may prepare it ahead
        self.recipe = (CalibrationRecipe(self.options.virtual_coils, SENSE_CALIBRATION_REGION, sense_options=True)
                       if self.method in ("sense", "classical") else None)
        if self.recipe is not None:
            declare_recipe(context, self.recipe)

    def __call__(self, items):
        for item in items:
            if isinstance(item, KSpaceSlice):
                yield from self._reconstruct(item)
            else:
                yield item

    def _reconstruct(self, item: KSpaceSlice):
        self.context.check_cancelled(f"{item.key}")
        sampling = None       # computed once: partitions takes it (it refuses holes the 2D path does not take)
        if self.method in ("sense", "classical") and item.kspace.shape[1] == 1:
            sampling = sampling_of(item.kspace)
            if sampling.holes_in_lines:
                yield from self._sense_2d(item, sampling)
                return
        planes = partitions(item, self.acs_as_data, sampling)
        calibration = prepared_calibration(item, self.recipe) if len(planes) == 1 else None
        results = [reconstruct_classical(data, self.method, self.options,
                                         maps=calibration.sense_calibration if calibration else None)
                   for data in planes]
        first = results[0]
        if first.note and first.note not in self.noted:
            self.noted.add(first.note)
            yield Notice(f"{item.key}: {first.note} (further slices with the same reason are not announced)")
        meta = dict(first.meta)
        if calibration is not None:
            meta.update(calibration.meta(item.first_line_time))
        if len(results) > 1:
            meta["PISF_ReconMs"] = f"{sum(float(r.meta['PISF_ReconMs']) for r in results):.1f}"
        yield ReconImage(key=item.key, data=np.stack([r.magnitude for r in results]), line_header=item.line_header,
                         recon=f"{first.description}, R {float(meta['PISF_Acceleration']):.1f}", meta=meta,
                         complete=item.complete, last_line_time=item.last_line_time)


    def _sense_2d(self, item: KSpaceSlice, sampling):
        """A slice with holes inside its lines: 2D CG-SENSE (l2; said once per scan)."""
        image = sense_2d_image(item, sampling, self.options.virtual_coils)
        if "2d" not in self.noted:
            self.noted.add("2d")
            yield Notice(f"{item.key}: {sampling.describe()}; reconstructed by {image.recon}, not row by row"
                         + (" (regulariser l1 applies to 1D sampling only: l2 used)"
                            if self.options.sense_regulariser == "l1" else ""))
        yield image


def sense_2d_image(item: KSpaceSlice, sampling, virtual_coils: int, prefix: str = "",
                   extra: dict | None = None) -> ReconImage:
    """The 2D CG-SENSE ReconImage of a 2D slice whose lines have holes (the sense stage's, and the
    pisf stage's fallback for it). InputError when its fully sampled centre cannot calibrate."""
    started = time.perf_counter()
    kspace = item.kspace[:, 0]
    try:
        image, facts = sense_2d(kspace, np.any(kspace != 0, axis=0), virtual_coils)
    except ValueError as exc:
        raise InputError(f"{item.key}: {sampling.describe()}; {exc}: refused") from None
    lines, columns = facts["region"]
    description = f"2D SENSE (ESPIRiT maps from the fully sampled {lines}x{columns} centre, CG on the whole image)"
    meta = {"PISF_Method": "SENSE-2D", "PISF_Acceleration": f"{sampling.sample_acceleration:.2f}",
            "PISF_SampleAcceleration": f"{sampling.sample_acceleration:.2f}",
            "PISF_VirtualCoils": str(facts["virtual_coils"]), "PISF_DataConsistency": f"{facts['consistency']:.4f}",
            "PISF_ReconMs": f"{(time.perf_counter() - started) * 1e3:.1f}"}
    meta.update(extra or {})
    return ReconImage(key=item.key, data=np.abs(image)[None].astype(np.float32), line_header=item.line_header,
                      recon=f"{prefix}{description}, R {sampling.sample_acceleration:.1f}", meta=meta,
                      complete=item.complete, last_line_time=item.last_line_time)


class GrappaRecon(ClassicalRecon):
    method = "grappa"

    def _reconstruct(self, item: KSpaceSlice):
        """GRAPPA as asked; where the geometry makes it weak, one Notice per scan says so (checked
        only until said: later slices would not be announced anyway)."""
        weak = ("weak" not in self.noted
                and grappa_weakness_of(slice_data(item, self.acs_as_data), self.options.virtual_coils))
        if weak:
            self.noted.add("weak")
            yield Notice(f"{item.key}: GRAPPA is weak on this geometry ({weak}); the sense or classical chain "
                         "reconstructs such scans with SENSE (further slices are not announced)")
        yield from super()._reconstruct(item)


class ClassicalChoiceRecon(ClassicalRecon):
    """The `classical` chain: GRAPPA or SENSE per slice by `choose_method`; the image meta names the
    method (PISF_Method), why (PISF_MethodChoice) and its parameters (PISF_Lambda for SENSE)."""
    method = "classical"

    def _reconstruct(self, item: KSpaceSlice):
        for image in super()._reconstruct(item):
            if (isinstance(image, ReconImage) and image.meta.get("PISF_Method") in ("SENSE", "SENSE-l1")
                    and "GRAPPA weak" in image.meta.get("PISF_MethodChoice", "") and "chosen" not in self.noted):
                self.noted.add("chosen")
                yield Notice(f"{item.key}: {image.meta['PISF_MethodChoice']} (further slices are not announced)")
            yield image


class SenseRecon(ClassicalRecon):
    method = "sense"

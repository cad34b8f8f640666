"""Image finishing: magnitude, crop to the recon matrix, scaling, ISMRMRD image headers and meta."""
from __future__ import annotations

import time

import ismrmrd
import numpy as np

from .context import StreamContext
from .items import Notice, ReconImage

_DTYPES = {"ushort": np.uint16, "short": np.int16, "float": np.float32}
_MAX_VALUE = {"ushort": 4095.0, "short": 4095.0}  # 12-bit range, as consoles expect
# A recon stage that sends several series (pisf_recon side by side) names an image's series here;
# images without it go to the stage's `series_index`.
SERIES_META = "PISF_SeriesIndex"


def centre_crop(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop the trailing axes of `data` to `shape` around the centre (no-op where smaller)."""
    slices = [slice(None)] * (data.ndim - len(shape))
    for size, want in zip(data.shape[-len(shape):], shape):
        start = max((size - want) // 2, 0)
        slices.append(slice(start, start + min(want, size)))
    return data[tuple(slices)]


class ImageFinish:
    """Turns ReconImages into ismrmrd.Images.

    Scaling: one factor per series, so intensities compare across slices and phases: the first
    image with signal fixes it (its 99.5th percentile maps to `target_percentile_value`). No single
    image can spoil the series: an empty (all-zero) image never sets it, and a later image whose
    99.5th percentile would clip at the integer maximum lowers it to fit (a TEXT says so; images
    already sent keep theirs). `scale` fixes it instead. Every image's meta carries the factor it
    was scaled with (PISF_ScaleFactor), so values can always be undone.
    Images whose meta names a series (SERIES_META) go to that series, with its own factor and
    image index; the others to `series_index`.
    """

    def __init__(self, context: StreamContext, data_type: str = "ushort", series_index: int = 1,
                 scale: float | None = None, target_percentile_value: float = 2048.0, comment: str | None = None,
                 fire: bool = False, sequence_description_additional: str = "PISF"):
        # FIRE-style consoles (python-ismrmrd-server conventions): int16 magnitude in 12 bits and the
        # meta attributes the console's image path reads (see _fire_meta).
        self.fire = bool(fire)
        self.sequence_description_additional = str(sequence_description_additional)
        if self.fire:
            data_type = "short"
        if data_type not in _DTYPES:
            raise ValueError(f"data_type must be one of {sorted(_DTYPES)}, not {data_type!r}")
        self.context = context
        self.data_type = data_type
        self.series_index = int(series_index)
        self.scale = float(scale) if scale is not None else None
        self.scales: dict[int, float] = {}
        self.target = float(target_percentile_value)
        self.comment = comment
        self.image_indices: dict[int, int] = {}

    def __call__(self, items):
        for item in items:
            if isinstance(item, ReconImage):
                yield from self._finish(item)
            else:
                yield item

    def _series_scale(self, series: int, magnitude: np.ndarray) -> tuple[float, Notice | None]:
        """The factor of this image of `series` and, when the series factor had to be lowered, the TEXT."""
        if self.scale is not None:
            return self.scale, None
        scale = self.scales.get(series)
        level = float(np.percentile(magnitude, 99.5)) if magnitude.size else 0.0
        if level <= 0:
            level = float(magnitude.max()) if magnitude.size else 0.0   # sparse images: their brightest pixel
        if level <= 0:
            return (scale if scale is not None else 1.0), None            # empty: sets nothing
        if scale is None:
            self.scales[series] = self.target / level
            return self.scales[series], None
        ceiling = _MAX_VALUE.get(self.data_type)
        if ceiling is None or level * scale <= ceiling:
            return scale, None
        # an earlier image was much darker (near-empty, noise only): it must not clip this one and the rest
        lowered = self.scales[series] = self.target / level
        return lowered, Notice(f"series {series}: image {self.image_indices.get(series, 0) + 1} is {level * scale / self.target:.1f}x "
                               f"brighter than the series scale allowed (it would clip at {ceiling:.0f}): scale factor "
                               f"{scale:.6g} -> {lowered:.6g} from this image on (PISF_ScaleFactor in each image's meta)")

    def _finish(self, recon: ReconImage):
        """The ismrmrd.Image of a ReconImage (after a Notice when the series scale changed)."""
        enc = self.context.encoding
        rx, ry, rz = enc.recon_matrix
        magnitude = np.abs(recon.data).astype(np.float32)
        if magnitude.shape[0] > rz:
            magnitude = centre_crop(magnitude, (rz, ry, rx))
        else:
            magnitude = centre_crop(magnitude, (ry, rx))
        series = int(recon.meta.get(SERIES_META, self.series_index))
        scale, notice = self._series_scale(series, magnitude)
        if notice is not None:
            yield notice
        scaled = magnitude * scale
        if self.data_type in _MAX_VALUE:
            scaled = np.clip(np.rint(scaled), 0, _MAX_VALUE[self.data_type])
        pixels = scaled.astype(_DTYPES[self.data_type])
        low, high = np.percentile(scaled, [1.0, 99.5])
        self.image_indices[series] = self.image_indices.get(series, 0) + 1
        image = ismrmrd.Image.from_array(pixels, transpose=False)
        head = image.getHead()
        self._copy_geometry(head, recon.line_header)
        head.field_of_view = tuple(float(v) for v in enc.recon_fov_mm)
        head.image_type = ismrmrd.IMTYPE_MAGNITUDE
        head.image_index = self.image_indices[series]
        head.image_series_index = series
        image.setHead(head)
        image.data[:] = pixels.reshape(image.data.shape)
        comment = self.comment or recon.recon
        meta = ismrmrd.Meta({
            "DataRole": "Image",
            "ImageProcessingHistory": ["PISF", comment],
            "ImageComment": comment,
            "GADGETRON_ImageComment": comment,
            "SeriesDescription": comment,
            "WindowCenter": f"{(high + low) / 2:.1f}",
            "WindowWidth": f"{max(high - low, 1.0):.1f}",
            "GADGETRON_WindowCenter": f"{(high + low) / 2:.1f}",
            "GADGETRON_WindowWidth": f"{max(high - low, 1.0):.1f}",
            "PISF_ScaleFactor": f"{scale:.6g}",
            "PISF_Complete": "true" if recon.complete else "false",
            # Last line of the slice reaching the server -> image finished (queueing included).
            "PISF_LatencyMs": f"{(time.monotonic() - recon.last_line_time) * 1e3:.1f}",
        })
        meta.update({k: str(v) for k, v in recon.meta.items()})
        if self.fire:
            self._fire_meta(meta, head, comment)
        image.attribute_string = meta.serialize()
        yield image

    def _fire_meta(self, meta, head: ismrmrd.ImageHeader, comment: str) -> None:
        """Attributes a FIRE console reads: role, history, window (already set), the text appended
        to the series description, the image plane directions, and Keep_image_geometry = 1 (the
        pixels keep the acquisition's row/column order; the console must not reorient them)."""
        meta["DataRole"] = "Image"
        meta["ImageProcessingHistory"] = ["PYTHON", "PISF"]
        meta["SequenceDescriptionAdditional"] = self.sequence_description_additional
        meta["ImageComments"] = comment
        meta["Keep_image_geometry"] = "1"
        meta["ImageRowDir"] = [f"{float(v):.18f}" for v in head.read_dir]
        meta["ImageColumnDir"] = [f"{float(v):.18f}" for v in head.phase_dir]

    @staticmethod
    def _copy_geometry(head: ismrmrd.ImageHeader, line: ismrmrd.AcquisitionHeader) -> None:
        for name in ("measurement_uid", "position", "read_dir", "phase_dir", "slice_dir",
                     "patient_table_position", "acquisition_time_stamp", "physiology_time_stamp"):
            setattr(head, name, getattr(line, name))
        for name in ("average", "slice", "contrast", "phase", "repetition", "set"):
            setattr(head, name, getattr(line.idx, name))

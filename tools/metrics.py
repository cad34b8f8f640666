"""Image-quality metrics with fastMRI definitions, on magnitude (RSS) images.

PSNR and SSIM use scikit-image with data_range = reference max (SSIM 7x7 window);
NMSE = ||ref - pred||^2 / ||ref||^2. Reconstructions are scale-matched to the reference
(least squares) first, since methods differ in global intensity scaling.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def scale_match(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """prediction * a with a = argmin ||reference - a prediction||^2."""
    prediction = np.asarray(prediction, dtype=np.float64)
    denominator = float(np.vdot(prediction, prediction).real)
    if denominator == 0:
        return prediction
    return prediction * (float(np.vdot(prediction, reference).real) / denominator)


def nmse(reference: np.ndarray, prediction: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(reference - prediction) ** 2 / np.linalg.norm(reference) ** 2)


def psnr(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if mask is not None:
        mse = float(np.mean((reference[mask] - prediction[mask]) ** 2))
        return float(10 * np.log10(reference.max() ** 2 / mse)) if mse > 0 else float("inf")
    return float(peak_signal_noise_ratio(reference, prediction, data_range=reference.max()))


def ssim(reference: np.ndarray, prediction: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    return float(structural_similarity(reference, np.asarray(prediction, dtype=np.float64), win_size=7,
                                       data_range=reference.max()))


def foreground_mask(reference: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Object support: pixels above `fraction` of the max after light smoothing, holes filled."""
    smoothed = ndimage.gaussian_filter(np.asarray(reference, dtype=np.float64), 2.0)
    mask = smoothed > fraction * smoothed.max()
    return ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=3))

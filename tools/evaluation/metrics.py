"""Image-quality metrics with fastMRI definitions, on RSS magnitude images (numpy + skimage).

Every metric takes (reference, prediction) 2D magnitude arrays; `scale_match(prediction,
reference)` (least-squares scale of the prediction to the reference) comes first, since
reconstructions differ in global scale (coil combination, normalisation).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def scale_match(prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """prediction * a with a = <pred, ref> / <pred, pred> (least squares)."""
    pred = np.asarray(prediction, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    denom = float(np.vdot(pred, pred).real)
    return pred * (float(np.vdot(pred, ref).real) / denom if denom > 0 else 1.0)


def nmse(reference: np.ndarray, prediction: np.ndarray) -> float:
    """||ref - pred||^2 / ||ref||^2."""
    ref = np.asarray(reference, dtype=np.float64)
    return float(np.sum((ref - prediction) ** 2) / np.sum(ref ** 2))


def psnr(reference: np.ndarray, prediction: np.ndarray) -> float:
    """fastMRI PSNR: data_range = reference.max()."""
    ref = np.asarray(reference, dtype=np.float64)
    return float(peak_signal_noise_ratio(ref, np.asarray(prediction, dtype=np.float64),
                                         data_range=ref.max()))


def ssim(reference: np.ndarray, prediction: np.ndarray) -> float:
    """fastMRI SSIM: skimage structural_similarity, 7x7 window, data_range = reference.max()."""
    ref = np.asarray(reference, dtype=np.float64)
    return float(structural_similarity(ref, np.asarray(prediction, dtype=np.float64),
                                       win_size=7, data_range=ref.max()))


def foreground_mask(reference: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Object support: reference > fraction * max, holes filled, small specks removed."""
    ref = np.asarray(reference, dtype=np.float64)
    mask = ref > fraction * ref.max()
    mask = ndimage.binary_opening(mask, iterations=2)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=3))
    return mask


def foreground_psnr(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR over the foreground only (peak = reference.max()); background noise not counted."""
    ref = np.asarray(reference, dtype=np.float64)
    mask = foreground_mask(ref) if mask is None else mask
    mse = float(np.mean((ref[mask] - np.asarray(prediction, dtype=np.float64)[mask]) ** 2))
    return float(10 * np.log10(ref.max() ** 2 / mse)) if mse > 0 else float("inf")


def foreground_ssim(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM (as `ssim`) averaged over the foreground only: the whole-image SSIM is dominated by
    how a method renders the background noise (a denoised background scores low)."""
    ref = np.asarray(reference, dtype=np.float64)
    mask = foreground_mask(ref) if mask is None else mask
    _, ssim_map = structural_similarity(ref, np.asarray(prediction, dtype=np.float64), win_size=7,
                                        data_range=ref.max(), full=True)
    return float(ssim_map[mask].mean())


def all_metrics(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Scale-match the prediction, then PSNR, SSIM, NMSE and foreground PSNR."""
    matched = scale_match(prediction, reference)
    return {"psnr": psnr(reference, matched), "ssim": ssim(reference, matched),
            "nmse": nmse(reference, matched), "psnr_fg": foreground_psnr(reference, matched, mask)}

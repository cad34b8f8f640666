"""The classical chains' reconstruction core as `pisf evaluate` methods.

    pisf evaluate --model none --method classical=tools.evaluation.classical:classical \
                  --method grappa=tools.evaluation.classical:grappa \
                  --method sense=tools.evaluation.classical:sense --method sense_l1=tools.evaluation.classical:sense_l1

Each factory returns method(image_kspace, mask, calibration_kspace) -> magnitude image, calling
exactly what the `grappa` / `sense` chain stages call (gadgets.classical.reconstruct_classical)
with the chains' defaults; the calibration lines are the non-zero lines of calibration_kspace
(embedded cases: also image lines; separate cases: calibration only).
"""
from __future__ import annotations

import os

import numpy as np


def _method(name: str, **defaults):
    from gadgets.classical import ClassicalOptions, reconstruct_classical
    from gadgets.slices import SliceData
    from tools.evaluation.datasets import sampled_lines

    options = ClassicalOptions(**{**defaults, **{k: _number_or_word(v) for k, v in _env_options().items()}})

    def method(image_kspace, mask, calibration_kspace):
        data = SliceData(np.asarray(image_kspace, np.complex64), np.asarray(mask, np.float32),
                         np.asarray(calibration_kspace, np.complex64), sampled_lines(calibration_kspace))
        return reconstruct_classical(data, name, options).magnitude

    method.metadata = {"method": name, "options": vars(options)}
    return method


def _number_or_word(text: str):
    try:
        return float(text)
    except ValueError:
        return text                       # e.g. sense_lambda=auto


def _env_options() -> dict:
    """PISF_CLASSICAL_<OPTION>=value overrides (for tuning sweeps only; the chains use defaults)."""
    prefix = "PISF_CLASSICAL_"
    return {k[len(prefix):].lower(): v for k, v in os.environ.items() if k.startswith(prefix)}


def grappa():
    return _method("grappa")


def classical():
    """The classical chain's core: GRAPPA or SENSE (automatic lambda) per case geometry."""
    return _method("classical")


def sense():
    """The sense chain's core with its defaults (l2, automatic lambda per scan)."""
    return _method("sense")


def sense_fixed():
    """The sense chain's core at the fixed lambda it used before automatic regularisation."""
    from gadgets.classical import FIXED_SENSE_LAMBDA
    return _method("sense", sense_lambda=FIXED_SENSE_LAMBDA)


def sense_l1():
    """The sense chain with `regulariser: l1` (Haar-wavelet l1, FISTA; lambda per scan)."""
    return _method("sense", sense_regulariser="l1")


def sense_l1_fixed():
    """sense_l1 at the fixed lambda it used before the automatic choice."""
    from gadgets.classical import FIXED_SENSE_L1_LAMBDA
    return _method("sense", sense_regulariser="l1", sense_l1_lambda=FIXED_SENSE_L1_LAMBDA)

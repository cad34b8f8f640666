"""Numerical reconstruction cores, no stream knowledge: FFT convention, coil compression, the
PISF inference core; calibration and classical solvers land here. numpy + onnxruntime only."""

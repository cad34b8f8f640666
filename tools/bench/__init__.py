"""Benchmarks: the server per chain (`pisf bench`) and the PISF inference core (`pisf bench-model`)."""

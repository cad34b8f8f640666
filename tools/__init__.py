"""Offline tooling (simulate, train, export, evaluate, bench) and the `pisf` command line."""

"""Offline tooling around the server, in wings along the data path: rawdata/ (raw data in),
training/, evaluation/, session/ (replay/demo/report), bench/; `cli.py` is the `pisf` command line."""

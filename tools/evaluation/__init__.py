"""`pisf evaluate` and its parts: real datasets and cases, metrics, BART anchors, classical methods."""

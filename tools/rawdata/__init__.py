"""Raw data in: the simulator, `pisf convert` with one reader per vendor/dataset format, k-space
streaming helpers, ground truth inside the raw group, BART .cfl files, k-space masks."""

"""One reader per input format of `pisf convert`; each turns a file into a `Source`."""

"""The console side of a session: replay, demo, reports, DICOM export, protocol fuzzing, and the
helper that starts and stops a `pisf serve` process."""

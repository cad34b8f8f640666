"""The ISMRMRD streaming protocol side: frame reader/writers, per-acquisition validation, the
embedded server, the replay client (`pisf replay`), TLS."""

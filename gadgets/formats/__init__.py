"""Output formats written from reconstructed ISMRMRD images: DICOM."""

"""What the Cartesian chains refuse before reconstructing, and the words they use.

Every chain here places lines on a Cartesian grid (gadgets/accumulate.py) and Fourier-transforms
it. Data that are not Cartesian k-space would come out as a confident wrong image, so they are
refused with one ERROR naming what was seen:
- a header trajectory other than cartesian (radial, golden angle, spiral, other);
- EPI: a header trajectory `epi`, a trajectory description with ramp times (ramp-sampled readouts
  need regridding), or imaging lines flagged ACQ_IS_REVERSE (read with the gradient reversed:
  odd/even lines need phase correction). Gadgetron's EPI chain (EPIReconXGadget for the ramps,
  EPICorrGadget for the odd/even correction) reconstructs such data; this server does not.
Phase-correction lines (ACQ_IS_PHASECORR_DATA) without reversed imaging lines are what Siemens TSE
sends too: they are not used, and the client hears so once (`PHASE_CORRECTION_NOTICE`).
What happens to 2D-undersampled and empty slices: gadgets/numerics/sampling.py and the stages.
"""
from __future__ import annotations

import ismrmrd

EPI_REFERENCES = ("Gadgetron's EPI chain (EPIReconXGadget regrids the ramps, EPICorrGadget corrects "
                  "odd/even lines) reconstructs it")
PHASE_CORRECTION_NOTICE = ("phase-correction lines (ACQ_IS_PHASECORR_DATA) arrived: this chain does not use them "
                           "(no odd/even or echo phase correction); the images are reconstructed from the imaging "
                           "lines as Cartesian k-space")


def _value(field) -> str | None:
    value = getattr(field, "value", field)
    return str(value).lower() if value is not None else None


def ramp_parameters(encoding) -> list[str]:
    """Names of the trajectory description's parameters that describe ramp sampling (rampUpTime,
    rampDownTime, as siemens_to_ismrmrd writes them for EPI)."""
    description = getattr(encoding, "trajectoryDescription", None)
    if description is None:
        return []
    names = [p.name for p in list(description.userParameterLong or []) + list(description.userParameterDouble or [])]
    return [name for name in names if name and "ramp" in name.lower()]


def header_kind(header) -> str:
    """'cartesian', 'epi' (trajectory epi, or an EPI or ramp-sampling trajectory description), or the
    header's other trajectory (radial, goldenangle, spiral, other). No encoding: 'cartesian'."""
    encoding = header.encoding[0] if header.encoding else None
    if encoding is None:
        return "cartesian"                        # Encoding.from_header says what is missing
    trajectory = _value(encoding.trajectory) or "cartesian"
    description = getattr(encoding, "trajectoryDescription", None)
    identifier = str(getattr(description, "identifier", "") or "")
    if trajectory == "epi" or ramp_parameters(encoding) or "epi" in identifier.lower():
        return "epi"
    return trajectory


def header_refusal(header) -> str | None:
    """Why a Cartesian chain cannot reconstruct this scan (from the header alone), or None."""
    kind = header_kind(header)
    if kind == "cartesian":
        return None
    encoding = header.encoding[0]
    trajectory = _value(encoding.trajectory)
    description = getattr(encoding, "trajectoryDescription", None)
    identifier = str(getattr(description, "identifier", "") or "")
    ramps = ramp_parameters(encoding)
    if kind == "epi":
        seen = [f"header trajectory {trajectory}"]
        if identifier:
            seen.append(f"trajectory description {identifier}")
        if ramps:
            seen.append(f"ramp-sampled readouts ({', '.join(ramps)})")
        return (f"EPI data ({'; '.join(seen)}): this server has no EPI reconstruction (no ramp-sampling "
                f"regridding, no odd/even phase correction), and a Cartesian FFT of EPI lines is a ghosted, "
                f"blurred image; refused. {EPI_REFERENCES}")
    return (f"the header declares a {kind} trajectory: this chain reconstructs Cartesian k-space only "
            f"(lines placed on a grid by their ky counter), so every image would be wrong; refused. "
            f"A non-Cartesian reconstruction (gridding/NUFFT) is needed")


def reversed_line_refusal(acquisition: ismrmrd.Acquisition) -> str:
    """The ERROR for an imaging line flagged ACQ_IS_REVERSE on a header that did not say EPI."""
    return (f"acquisition {acquisition.scan_counter} is flagged ACQ_IS_REVERSE (read out with the gradient "
            f"reversed, as EPI and bipolar readouts are): this chain has no odd/even phase correction and would "
            f"make a ghosted Cartesian image; refused. {EPI_REFERENCES}")

"""`pisf export CHECKPOINT --out models/X.onnx`: ONNX export + torch/onnxruntime parity.

The graph follows models/CONTRACT.md, dynamic rows and ny, opset 17, DFTs as matrix products:
contract 1 (models/pisf_net.py): inputs `kspace` [rows, 2C, ny], `mask` [rows, 1, ny], output
`kspace_out`; contract 2 (models/pisf_sense.py): inputs `kspace`, `mask` and the coil maps
`sens` [rows, 2C, ny], output `image` [rows, 2, ny]; contract 3 (the default for the sense
architecture, models/pisf_v3.py): only the learned regularisers as one ONNX bank, inputs `image`,
`initial`, `block`, output `proposal`, the data consistency runs in numpy
(gadgets/numerics/pisf_unrolled.py); its parity check runs that runtime against the torch forward.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

OPSET = 17
COILS_V2 = 8     # virtual coils of contract 2 (the runtime compresses or zero-pads to this)


class Signature:
    """Names, example inputs and contract version of one architecture's graph."""

    def __init__(self, model):
        self.sense = model.__class__.__name__ == "PisfSenseNet"
        self.coils = COILS_V2 if self.sense else model.cfg.coils
        self.contract = "2" if self.sense else "1"
        self.inputs = ["kspace", "mask", "sens"] if self.sense else ["kspace", "mask"]
        self.output = "image" if self.sense else "kspace_out"

    def example(self, rows: int, ny: int, generator, scale: float = 1.0) -> tuple:
        import torch
        kspace = torch.randn(rows, 2 * self.coils, ny, generator=generator) * scale
        mask = (torch.rand(rows, 1, ny, generator=generator) > 0.6).float()
        if not self.sense:
            return kspace, mask
        sens = torch.randn(rows, 2 * self.coils, ny, generator=generator)
        norm = (sens[:, :self.coils] ** 2 + sens[:, self.coils:] ** 2).sum(1, keepdim=True).sqrt()   # unit RSS
        return kspace * mask, mask, sens / norm.repeat(1, 2 * self.coils, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (runs/NAME/best.pt or last.pt)")
    parser.add_argument("--out", required=True, help="ONNX file to write (models/pisf_fast.onnx)")
    parser.add_argument("--variant", default=None, help="pisf_variant metadata (default: from checkpoint)")
    parser.add_argument("--contract", choices=("1", "2", "3"), default=None,
                        help="ONNX contract (models/CONTRACT.md); default 3 for the sense architecture "
                             "(regulariser bank, numpy data consistency), 1 for the calibration-free one")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs error / max |output| allowed in the parity check")


def export_model(model, out_path: str | Path, metadata: dict, example_rows: int = 4,
                 example_ny: int = 64) -> Path:
    """Trace `model` (eval mode) to ONNX with dynamic rows/ny and attach metadata_props."""
    import onnx
    import torch

    model = model.eval()
    signature = Signature(model)
    example = signature.example(example_rows, example_ny, torch.Generator().manual_seed(0))
    from tools.cli import created_directory

    out_path = Path(out_path)
    created_directory(out_path.parent)
    dynamic = {name: {0: "rows", 2: "ny"} for name in signature.inputs + [signature.output]}
    if signature.sense:       # contract 2 takes any number of virtual coils
        dynamic["kspace"][1] = dynamic["sens"][1] = "channels"
    # The TorchScript exporter keeps ny symbolic through Shape/Range/Mod and needs no extra deps.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(out_path), input_names=signature.inputs,
                          output_names=[signature.output], dynamic_axes=dynamic,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return out_path


def parity(model, onnx_path: str | Path, cases=((3, 64), (17, 180), (8, 256), (2, 331))) -> dict:
    """Max abs error of onnxruntime vs torch over several (rows, ny), absolute and relative to
    max |torch output|."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval()
    signature = Signature(model)
    generator = torch.Generator().manual_seed(1)
    worst_abs = worst_rel = 0.0
    for rows, ny in cases:
        example = signature.example(rows, ny, generator, scale=0.1)
        with torch.no_grad():
            reference = model(*example).numpy()
        result = session.run([signature.output], {name: t.numpy() for name, t in
                                                  zip(signature.inputs, example)})[0]
        err = float(np.abs(result - reference).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.abs(reference).max()), 1e-12))
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel, "cases": [list(c) for c in cases]}


def load_checkpoint(path: str | Path):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("architecture") == "sense":
        from models.pisf_sense import PisfSenseNet, SenseNetConfig
        model = PisfSenseNet(SenseNetConfig(**state["model_cfg"]))
    else:
        from models.pisf_net import PisfConfig, PisfNet
        model = PisfNet(PisfConfig(**state["model_cfg"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def trained_ranges(state: dict) -> dict:
    """What the model saw in training, for the runtime's model-range guard (metadata)."""
    synth = state.get("synth_cfg", {})
    ny_lo, ny_hi = synth.get("ny_range", (64, 512))
    r_lo, r_hi = synth.get("acceleration", (2.0, 10.0))
    ranges = {"trained_ny_min": ny_lo, "trained_ny_max": ny_hi,
              "trained_acceleration_min": r_lo, "trained_acceleration_max": r_hi,
              "architecture": "sense"}
    ranges.update(trained_coil_limits(synth, (state.get("config") or {}).get("sense_synth") or {}, r_hi))
    return ranges


def trained_coil_limits(synth: dict, sense_synth: dict, r_hi: float) -> dict:
    """Receive-channel counts the model saw and the highest R at each: `trained_coils_min` and
    `trained_coil_acceleration` "channels:R,..." (a slice with at least `channels` channels is
    inside up to R). Few-coil batches (config sense_synth.few_coils) were undersampled at most
    R = channels; the other batches came from `synth.physical_coils` arrays at any trained R."""
    arrays = int(synth.get("physical_coils", (8, 32))[0])
    limits = {arrays: float(r_hi)}
    if float(sense_synth.get("few_coil_prob", 0) or 0) > 0:
        for coils in sense_synth.get("few_coils", ()):
            if int(coils) < arrays:
                limits[int(coils)] = min(float(coils), float(r_hi))
    table = ",".join(f"{coils}:{limits[coils]:g}" for coils in sorted(limits))
    return {"trained_coils_min": min(limits), "trained_coil_acceleration": table}


def run(args: argparse.Namespace) -> int:
    from models.pisf_net import macs_per_pixel, parameter_count

    model, state = load_checkpoint(args.checkpoint)
    signature = Signature(model)
    metadata = {"coils": signature.coils, "pisf_variant": args.variant or state.get("variant", "custom"),
                "training_steps": state.get("step", 0), "contract": signature.contract,
                "blocks": model.cfg.blocks, "features": model.cfg.features,
                "parameters": parameter_count(model)}
    if signature.sense:
        metadata.update(trained_ranges(state))
    contract = args.contract or ("3" if signature.sense else "1")
    if contract != signature.contract and not (signature.sense and contract == "3"):
        print(f"contract {contract} does not fit a {type(model).__name__} checkpoint")
        return 1
    if contract == "3":
        from models import pisf_v3
        metadata.update(pisf_v3.runtime_metadata(model), contract="3")
        path = pisf_v3.export_bank(model, args.out, metadata)
        check = pisf_v3.parity(model, path)
    else:
        path = export_model(model, args.out, metadata)
        check = parity(model, path)
    report = {"onnx": str(path), "size_bytes": path.stat().st_size, **metadata, **check}
    if not signature.sense:
        report["macs_per_pixel_ny256"] = round(macs_per_pixel(model.cfg, 256)["total"])
    print(json.dumps(report, indent=1))
    if check["max_rel_error"] > args.tolerance:
        print(f"parity check FAILED: relative error {check['max_rel_error']:.2e} > {args.tolerance:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="pisf export")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))

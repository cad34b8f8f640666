"""`pisf export CHECKPOINT --out models/pisf_fast.onnx`: ONNX export + torch/onnxruntime parity.

The graph follows models/CONTRACT.md: inputs `kspace` [rows, 2C, ny] and `mask` [rows, 1, ny],
output `kspace_out`, dynamic rows and ny, opset 17, DFTs as matrix products built from ny.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CONTRACT_VERSION = "1"
OPSET = 17


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (runs/NAME/best.pt or last.pt)")
    parser.add_argument("--out", required=True, help="ONNX file to write (models/pisf_fast.onnx)")
    parser.add_argument("--variant", default=None, help="pisf_variant metadata (default: from checkpoint)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs error / max |output| allowed in the parity check")


def export_model(model, out_path: str | Path, metadata: dict, example_rows: int = 4,
                 example_ny: int = 64) -> Path:
    """Trace `model` (eval mode) to ONNX with dynamic rows/ny and attach metadata_props."""
    import onnx
    import torch

    model = model.eval()
    channels = 2 * model.cfg.coils
    generator = torch.Generator().manual_seed(0)
    kspace = torch.randn(example_rows, channels, example_ny, generator=generator)
    mask = (torch.rand(example_rows, 1, example_ny, generator=generator) > 0.6).float()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {"kspace": {0: "rows", 2: "ny"}, "mask": {0: "rows", 2: "ny"},
               "kspace_out": {0: "rows", 2: "ny"}}
    # The TorchScript exporter keeps ny symbolic through Shape/Range/Mod and needs no extra deps.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (kspace, mask), str(out_path), input_names=["kspace", "mask"],
                          output_names=["kspace_out"], dynamic_axes=dynamic,
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
    generator = torch.Generator().manual_seed(1)
    worst_abs = worst_rel = 0.0
    for rows, ny in cases:
        kspace = torch.randn(rows, 2 * model.cfg.coils, ny, generator=generator) * 0.1
        mask = (torch.rand(rows, 1, ny, generator=generator) > 0.7).float()
        with torch.no_grad():
            reference = model(kspace, mask).numpy()
        result = session.run(["kspace_out"], {"kspace": kspace.numpy(), "mask": mask.numpy()})[0]
        err = float(np.abs(result - reference).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.abs(reference).max()), 1e-12))
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel, "cases": [list(c) for c in cases]}


def load_checkpoint(path: str | Path):
    import torch

    from models.pisf_net import PisfConfig, PisfNet
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = PisfNet(PisfConfig(**state["model_cfg"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def run(args: argparse.Namespace) -> int:
    from models.pisf_net import macs_per_pixel, parameter_count

    model, state = load_checkpoint(args.checkpoint)
    metadata = {"coils": model.cfg.coils, "pisf_variant": args.variant or state.get("variant", "custom"),
                "training_steps": state.get("step", 0), "contract": CONTRACT_VERSION,
                "blocks": model.cfg.blocks, "features": model.cfg.features,
                "parameters": parameter_count(model)}
    path = export_model(model, args.out, metadata)
    check = parity(model, path)
    report = {"onnx": str(path), "size_bytes": path.stat().st_size, **metadata,
              "macs_per_pixel_ny256": round(macs_per_pixel(model.cfg, 256)["total"]), **check}
    print(json.dumps(report, indent=1))
    if check["max_rel_error"] > args.tolerance:
        print(f"parity check FAILED: relative error {check['max_rel_error']:.2e} > {args.tolerance:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="pisf export")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))

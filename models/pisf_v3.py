"""PISF v3 export (contract 3): the learned regularisers of a trained PisfSenseNet as one ONNX
"regulariser bank"; the data consistency runs outside the graph (numpy FFTs,
gadgets/numerics/pisf_unrolled.py). Torch; training and export only.

The network function is v2's (models/pisf_sense.py). The bank holds every block's regulariser
with its weights stacked [blocks, ...]; the int64 input `block` gathers one block's weights, and
the convolutions take them as inputs. BatchNorm (eval statistics) is folded into the conv before
it, so a block is conv -> residual units -> soft threshold -> residual units -> conv. The scalars
the runtime needs (lambdas, mus, CG counts) go into the ONNX metadata (`runtime_metadata`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.pisf_sense import PisfSenseNet, Regulariser

OPSET = 17
BANK_INPUTS = ("image", "initial", "block")
BANK_OUTPUT = "proposal"


def folded_conv(conv: nn.Conv1d, norm: nn.BatchNorm1d | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by norm in eval mode, as one conv."""
    weight = conv.weight.detach().clone()
    bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(weight.shape[0])
    if norm is not None:
        factor = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        weight = weight * factor[:, None, None]
        bias = (bias - norm.running_mean) * factor + norm.bias.detach()
    return weight, bias


def block_layers(block: Regulariser) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every conv of one regulariser in forward order, BatchNorm folded: head, per residual unit
    (conv1+norm, conv2) before the threshold, the gate's two 1x1 convs, the same after, tail."""
    layers = [folded_conv(block.head)]
    for unit in block.before:
        layers += [folded_conv(unit.conv1, unit.norm), folded_conv(unit.conv2)]
    gate = block.shrink.gate
    layers += [folded_conv(gate[0], gate[1]), folded_conv(gate[3])]
    for unit in block.after:
        layers += [folded_conv(unit.conv1, unit.norm), folded_conv(unit.conv2)]
    layers.append(folded_conv(block.tail))
    return layers


class RegulariserBank(nn.Module):
    """proposal = regulariser_block(image, initial) with block chosen at run time.

    image [rows, 2, ny], initial [rows, 4, ny] (the two Tikhonov starts), block int64 scalar.
    `fixed_block` bakes one block's weights in as constants (the per-block graph used to time
    dynamic-weight convs against constant ones)."""

    def __init__(self, net: PisfSenseNet, fixed_block: int | None = None):
        super().__init__()
        net = net.eval()
        self.kernel = net.cfg.kernel
        self.dilations = [1 + (i % 2) for i in range(net.cfg.res_units)]   # as Regulariser
        self.res_units = net.cfg.res_units
        per_block = [block_layers(block) for block in net.blocks]
        self.fixed_block = fixed_block
        for index in range(len(per_block[0])):
            self.register_buffer(f"weight{index}", torch.stack([layers[index][0] for layers in per_block]))
            self.register_buffer(f"bias{index}", torch.stack([layers[index][1] for layers in per_block]))

    def layer(self, index: int, block: torch.Tensor):
        weight, bias = getattr(self, f"weight{index}"), getattr(self, f"bias{index}")
        if self.fixed_block is not None:
            return weight[self.fixed_block], bias[self.fixed_block]
        chosen = block.reshape(1)
        return weight.index_select(0, chosen)[0], bias.index_select(0, chosen)[0]

    def conv(self, h, index: int, block, dilation: int = 1):
        weight, bias = self.layer(index, block)
        return nn.functional.conv1d(h, weight, bias, padding=dilation * (self.kernel // 2), dilation=dilation)

    def residual_units(self, h, first: int, block):
        for unit, dilation in enumerate(self.dilations):
            index = first + 2 * unit
            h = h + self.conv(torch.relu(self.conv(h, index, block, dilation)), index + 1, block, dilation)
        return h

    def forward(self, image, initial, block):
        h = self.conv(torch.cat([image, initial], 1), 0, block)
        h = self.residual_units(h, 1, block)
        gate_index = 1 + 2 * self.res_units
        magnitude = h.abs()
        mean = magnitude.mean(dim=-1, keepdim=True)                          # [rows, F, 1]
        w1, b1 = self.layer(gate_index, block)
        w2, b2 = self.layer(gate_index + 1, block)
        gate = torch.relu(mean[..., 0] @ w1[..., 0].T + b1) @ w2[..., 0].T + b2
        h = torch.sign(h) * torch.relu(magnitude - mean * torch.sigmoid(gate[..., None]))
        h = self.residual_units(h, gate_index + 2, block)
        return image + self.conv(h, gate_index + 2 + 2 * self.res_units, block)


def runtime_metadata(net: PisfSenseNet) -> dict:
    """The scalars of the unrolled data consistency, as contract 3's metadata strings."""
    softplus = nn.functional.softplus
    mus = softplus(net.block_mu.detach()).tolist()
    return {"init_lambda": repr(float(softplus(net.init_lambda.detach()))),
            "smooth_lambda": repr(float(softplus(net.smooth_lambda.detach()))),
            "block_mu": ",".join(repr(float(m)) for m in mus),
            "blocks": net.cfg.blocks, "init_cg": net.cfg.init_cg, "block_cg": net.cfg.block_cg}


def example_inputs(rows: int = 4, ny: int = 64, block: int = 0, generator=None) -> tuple:
    image = torch.randn(rows, 2, ny, generator=generator)
    initial = torch.randn(rows, 4, ny, generator=generator)
    return image, initial, torch.tensor(block, dtype=torch.int64)


def export_bank(net: PisfSenseNet, out_path: str | Path, metadata: dict,
                fixed_block: int | None = None) -> Path:
    """Trace the regulariser bank to ONNX (dynamic rows and ny) with metadata_props."""
    import warnings

    import onnx

    bank = RegulariserBank(net, fixed_block).eval()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: "rows", 2: "ny"} for name in ("image", "initial", BANK_OUTPUT)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(bank, example_inputs(), str(out_path), input_names=list(BANK_INPUTS),
                          output_names=[BANK_OUTPUT], dynamic_axes=dynamic, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return out_path


def example_rows(rows: int, ny: int, generator, coils: int = 8, scale: float = 0.1) -> tuple:
    """Synthetic network inputs (kspace [rows, 2C, ny] masked, mask [rows, 1, ny], unit-RSS
    maps [rows, 2C, ny]) as models.pisf_sense takes them."""
    kspace = torch.randn(rows, 2 * coils, ny, generator=generator) * scale
    mask = (torch.rand(rows, 1, ny, generator=generator) > 0.6).float()
    sens = torch.randn(rows, 2 * coils, ny, generator=generator)
    norm = (sens[:, :coils] ** 2 + sens[:, coils:] ** 2).sum(1, keepdim=True).sqrt()
    return kspace * mask, mask, sens / norm.repeat(1, 2 * coils, 1)


def as_complex(rows: torch.Tensor):
    """[rows, 2C, ny] (real parts, then imaginary) -> complex64 numpy [rows, C, ny]."""
    coils = rows.shape[1] // 2
    array = rows.numpy()
    return (array[:, :coils] + 1j * array[:, coils:]).astype("complex64")


def parity(net: PisfSenseNet, onnx_path: str | Path, cases=((3, 64), (17, 180), (8, 256), (2, 331)),
           multi_shift: bool = True) -> dict:
    """Max abs error of (numpy runtime + ONNX bank) against the torch forward (FFT form) over
    several (rows, ny), absolute and relative to max |torch output|."""
    import numpy as np
    import onnxruntime as ort

    from gadgets.numerics.pisf_unrolled import UnrolledPisf

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    runtime = UnrolledPisf(session, session.get_modelmeta().custom_metadata_map, multi_shift=multi_shift)
    net = net.eval()
    generator = torch.Generator().manual_seed(1)
    worst_abs = worst_rel = 0.0
    for rows, ny in cases:
        kspace, mask, sens = example_rows(rows, ny, generator)
        with torch.no_grad():
            reference = net(kspace, mask, sens).numpy()
        image = runtime.run(as_complex(kspace), mask[:, 0].numpy(), as_complex(sens))
        err = float(np.abs(np.stack([image.real, image.imag], 1) - reference).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.abs(reference).max()), 1e-12))
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel, "cases": [list(c) for c in cases]}

"""PISF v3 export (contract 3): the learned regularisers of a trained PisfSenseNet as one ONNX
"regulariser bank"; the data consistency runs outside the graph (numpy FFTs,
gadgets/numerics/pisf_unrolled.py). Torch; training and export only.

The network function is v2's (models/pisf_sense.py). Each block's regulariser is traced on its
own with constant weights, BatchNorm (eval statistics) folded into the conv before it, its 1D
convs written as 2D convs over a singleton axis; the bank is an ONNX `If` chain over the int64
input `block` whose branches are those graphs. Why this scheme (measured with onnxruntime 1.23
CPU, 5 blocks, shared 2-core machine, 1 thread): onnxruntime converts constant-weight 2D convs to
its blocked NCHWc kernels, which it cannot do for 1D convs or for weights gathered at run time:
256x256 rows 260 ms (If chain) vs 371 ms (weights stacked [blocks, ...] and gathered by `block`,
1D or 2D convs alike) vs about the same as gathered for five constant-weight 1D graphs; 384x384
1.43 s vs 2.10 s; 128x128 135 vs 176 ms. The scalars the runtime needs (lambdas, mus, CG
counts) go into the ONNX metadata (`runtime_metadata`).
"""
from __future__ import annotations

import io
import warnings
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


class FoldedRegulariser(nn.Module):
    """One block's regulariser (models.pisf_sense.Regulariser, eval mode) with BatchNorm folded
    and its 1D convs as 2D convs over a singleton axis [rows, F, 1, ny] (see the module
    docstring): proposal = regulariser(image [rows, 2, ny], initial [rows, 4, ny])."""

    def __init__(self, block: Regulariser, res_units: int):
        super().__init__()
        self.dilations = [1 + (i % 2) for i in range(res_units)]     # as Regulariser
        for index, (weight, bias) in enumerate(block_layers(block.eval())):
            self.register_buffer(f"weight{index}", weight[:, :, None, :])   # [out, in, 1, k]
            self.register_buffer(f"bias{index}", bias)

    def conv(self, h, index: int, dilation: int = 1):
        weight = getattr(self, f"weight{index}")
        return nn.functional.conv2d(h, weight, getattr(self, f"bias{index}"),
                                    padding=(0, dilation * (weight.shape[-1] // 2)), dilation=(1, dilation))

    def residual_units(self, h, first: int):
        for unit, dilation in enumerate(self.dilations):
            index = first + 2 * unit
            h = h + self.conv(torch.relu(self.conv(h, index, dilation)), index + 1, dilation)
        return h

    def forward(self, image, initial):
        image, initial = image[:, :, None, :], initial[:, :, None, :]
        h = self.residual_units(self.conv(torch.cat([image, initial], 1), 0), 1)
        gate_index = 1 + 2 * len(self.dilations)
        magnitude = h.abs()
        mean = magnitude.mean(dim=-1, keepdim=True)                          # [rows, F, 1, 1]
        gate = self.conv(torch.relu(self.conv(mean, gate_index)), gate_index + 1)
        h = torch.sign(h) * torch.relu(magnitude - mean * torch.sigmoid(gate))
        h = self.residual_units(h, gate_index + 2)
        return (image + self.conv(h, gate_index + 2 + 2 * len(self.dilations)))[:, :, 0, :]


def folded_blocks(net: PisfSenseNet) -> list[FoldedRegulariser]:
    return [FoldedRegulariser(block, net.cfg.res_units).eval() for block in net.eval().blocks]


def runtime_metadata(net: PisfSenseNet) -> dict:
    """The scalars of the unrolled data consistency, as contract 3's metadata strings."""
    softplus = nn.functional.softplus
    mus = softplus(net.block_mu.detach()).tolist()
    return {"init_lambda": repr(float(softplus(net.init_lambda.detach()))),
            "smooth_lambda": repr(float(softplus(net.smooth_lambda.detach()))),
            "block_mu": ",".join(repr(float(m)) for m in mus),
            "blocks": net.cfg.blocks, "init_cg": net.cfg.init_cg, "block_cg": net.cfg.block_cg}


def example_inputs(rows: int = 4, ny: int = 64, generator=None) -> tuple:
    return torch.randn(rows, 2, ny, generator=generator), torch.randn(rows, 4, ny, generator=generator)


def branch_graph(module: FoldedRegulariser, index: int):
    """One block traced to an ONNX graph usable as an `If` branch: no inputs of its own (it
    reads the bank's `image` and `initial` from the outer scope), names prefixed per block."""
    import onnx
    from onnx import TensorProto, helper

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example_inputs(), buffer, input_names=["image", "initial"],
                          output_names=[BANK_OUTPUT], opset_version=OPSET, do_constant_folding=True,
                          dynamic_axes={name: {0: "rows", 2: "ny"} for name in ("image", "initial", BANK_OUTPUT)},
                          dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph

    def renamed(name: str) -> str:
        return name if name in ("", "image", "initial") else f"block{index}/{name}"
    for node in graph.node:
        node.name = renamed(node.name or node.op_type)
        node.input[:] = [renamed(name) for name in node.input]
        node.output[:] = [renamed(name) for name in node.output]
    for tensor in graph.initializer:
        tensor.name = renamed(tensor.name)
    output = helper.make_tensor_value_info(renamed(BANK_OUTPUT), TensorProto.FLOAT, None)
    return helper.make_graph(list(graph.node), f"block{index}", [], [output], initializer=list(graph.initializer))


def bank_model(net: PisfSenseNet):
    """The contract-3 ONNX model: If(block == 0, block 0, If(block == 1, block 1, ... block B-1));
    a `block` beyond the last runs the last block (the runtime passes 0 .. blocks-1)."""
    from onnx import TensorProto, helper

    branches = [branch_graph(module, k) for k, module in enumerate(folded_blocks(net))]
    chain = branches[-1]
    for k in range(max(len(branches) - 2, 0), -1, -1):     # one block: If(block == 0, it, it)
        output = BANK_OUTPUT if k == 0 else f"proposal_from_{k}"
        node = helper.make_node("If", [f"is_block{k}"], [output], name=f"choose_block{k}",
                                then_branch=branches[k], else_branch=chain)
        chain = helper.make_graph([node], f"blocks_from_{k}", [],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])
    tests = []
    for k in range(max(len(branches) - 1, 1)):
        tests.append(helper.make_node("Constant", [], [f"index{k}"],
                                      value=helper.make_tensor(f"index{k}_value", TensorProto.INT64, [], [k])))
        tests.append(helper.make_node("Equal", ["block", f"index{k}"], [f"is_block{k}"]))
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["rows", 2, "ny"]),
              helper.make_tensor_value_info("initial", TensorProto.FLOAT, ["rows", 4, "ny"]),
              helper.make_tensor_value_info("block", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info(BANK_OUTPUT, TensorProto.FLOAT, ["rows", 2, "ny"])]
    graph = helper.make_graph(tests + list(chain.node), "pisf_regulariser_bank", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             producer_name="pisf-inline models/pisf_v3.py")


def export_bank(net: PisfSenseNet, out_path: str | Path, metadata: dict) -> Path:
    """Write the regulariser bank (dynamic rows and ny) with metadata_props."""
    import onnx

    proto = bank_model(net)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
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

"""Unrolled 1D PISF network (torch; training and export only, never imported by the runtime).

Each row is one readout position x of a slice: hybrid k-space along phase encoding, shape
[rows, 2C, ny] (C real parts, then C imaginary parts), plus the row's sampling mask [rows, 1, ny].
Every block: centred iDFT along ky -> CNN denoiser with a learned soft threshold (residual on the
coil images) -> centred DFT -> hard data consistency on the sampled ky. See REFERENCE.md section 4
and models/CONTRACT.md.

The DFTs are real matrix products built from ny inside the graph, so one ONNX file serves any
row length and runs on every onnxruntime provider (no complex tensors, no DFT op).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class PisfConfig:
    coils: int = 8          # C: virtual coils, 2C real channels
    blocks: int = 10        # unrolled iterations, no weight sharing
    features: int = 64      # F
    res_units: int = 2      # residual units before and after the soft threshold
    kernel: int = 3         # conv kernel along ky (image domain)

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS = {
    "full": PisfConfig(blocks=10, features=64),
    "fast": PisfConfig(blocks=5, features=24, res_units=1),
}


def centred_dft_parts(index: torch.Tensor, dtype=torch.float32):
    """(cos, sin) [ny, ny] of the centred orthonormal DFT W = cos - i sin of length ny, from
    index = arange(ny). Symmetric. Exponents are reduced modulo ny in integers so float32 stays
    exact for long rows; ny is derived from `index`, so a traced export keeps it dynamic (ONNX
    Shape -> Range -> Mod -> Cos/Sin), not a constant."""
    count = index[-1:] + 1
    count_float = count.to(dtype)
    shifted = index - torch.div(count, 2, rounding_mode="floor")
    exponent = torch.remainder(shifted[:, None] * shifted[None, :], count)
    angle = exponent.to(dtype) * (2.0 * torch.pi) / count_float
    norm = torch.rsqrt(count_float)
    return torch.cos(angle) * norm, torch.sin(angle) * norm


def centred_dft_matrices(ny: torch.Tensor | int, dtype=torch.float32, device=None):
    """Real block matrices (forward, inverse) of the centred orthonormal DFT of length ny.

    For rows laid out as [..., re(ny) | im(ny)] (last axis 2ny), `rows @ M` applies the
    complex transform.
    """
    cos, sin = centred_dft_parts(torch.arange(ny, device=device), dtype)
    # y = x W^T with W = cos - i sin (forward); inverse uses cos + i sin. Symmetric, so W^T = W.
    # [yr | yi] = [xr | xi] @ [[Wr, Wi], [-Wi, Wr]] for W = Wr + i Wi.
    forward = torch.cat([torch.cat([cos, -sin], 1), torch.cat([sin, cos], 1)], 0)
    inverse = torch.cat([torch.cat([cos, sin], 1), torch.cat([-sin, cos], 1)], 0)
    return forward, inverse


def apply_dft(rows: torch.Tensor, matrix: torch.Tensor, coils: int) -> torch.Tensor:
    """rows [N, 2C, ny] (real parts then imaginary parts) -> transformed, same layout."""
    n, _, ny = rows.shape
    # [N, 2, C, ny] -> [N, C, 2ny]: each coil's re|im concatenated along the last axis
    stacked = rows.reshape(n, 2, coils, ny).transpose(1, 2).reshape(n, coils, 2 * ny)
    out = torch.matmul(stacked, matrix)
    return out.reshape(n, coils, 2, ny).transpose(1, 2).reshape(n, 2 * coils, ny)


class ResidualUnit(nn.Module):
    def __init__(self, features: int, kernel: int, dilation: int = 1):
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv1 = nn.Conv1d(features, features, kernel, padding=pad, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm1d(features)
        self.conv2 = nn.Conv1d(features, features, kernel, padding=pad, dilation=dilation, bias=False)

    def forward(self, h):
        return h + self.conv2(torch.relu(self.norm(self.conv1(h))))


class SoftThreshold(nn.Module):
    """sign(h) relu(|h| - t), t = m sigmoid(g(m)), m = mean |h| along ky per channel."""

    def __init__(self, features: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv1d(features, features, 1), nn.BatchNorm1d(features), nn.ReLU(),
            nn.Conv1d(features, features, 1))

    def forward(self, h):
        magnitude = h.abs()
        mean = magnitude.mean(dim=-1, keepdim=True)
        threshold = mean * torch.sigmoid(self.gate(mean))
        return torch.sign(h) * torch.relu(magnitude - threshold)


class PisfBlock(nn.Module):
    def __init__(self, cfg: PisfConfig):
        super().__init__()
        channels, feats, k = 2 * cfg.coils, cfg.features, cfg.kernel
        self.head = nn.Conv1d(channels, feats, k, padding=k // 2)
        self.before = nn.Sequential(*[ResidualUnit(feats, k) for _ in range(cfg.res_units)])
        self.shrink = SoftThreshold(feats)
        self.after = nn.Sequential(*[ResidualUnit(feats, k) for _ in range(cfg.res_units)])
        self.tail = nn.Conv1d(feats, channels, k, padding=k // 2)
        # zero-initialised output: every block starts as the identity, so the untrained network
        # is zero filling + data consistency and training only has to improve on it
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, images):
        h = self.after(self.shrink(self.before(self.head(images))))
        return images + self.tail(h)


class PisfNet(nn.Module):
    def __init__(self, cfg: PisfConfig | None = None):
        super().__init__()
        self.cfg = cfg or PisfConfig()
        self.blocks = nn.ModuleList(PisfBlock(self.cfg) for _ in range(self.cfg.blocks))

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, return_all: bool = False):
        """kspace, output [rows, 2C, ny]; mask [rows, 1, ny]. return_all: every block's output."""
        forward_dft, inverse_dft = centred_dft_matrices(kspace.shape[-1], kspace.dtype, kspace.device)
        measured = kspace * mask
        current = measured
        outputs = []
        for block in self.blocks:
            images = apply_dft(current, inverse_dft, self.cfg.coils)
            estimate = apply_dft(block(images), forward_dft, self.cfg.coils)
            current = measured + (1.0 - mask) * estimate   # hard data consistency
            outputs.append(current)
        return outputs if return_all else current


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_pixel(cfg: PisfConfig, ny: int = 256) -> dict:
    """Multiply-accumulates per output pixel (one ky sample of one row), by part.

    Convs along ky cost in_ch * out_ch * kernel per pixel; the two dense DFTs per block cost
    4 * C * ny real MACs per pixel each (complex ny x ny matrix on C coils), so they grow with ny.
    The threshold gate works on one value per channel and row, i.e. 2F^2/ny per pixel.
    """
    c2, f, k = 2 * cfg.coils, cfg.features, cfg.kernel
    conv = c2 * f * k + 2 * cfg.res_units * 2 * f * f * k + f * c2 * k
    gate = 2 * f * f / ny
    dft = 2 * 4 * cfg.coils * ny
    per_block = {"conv": conv, "gate": gate, "dft": dft}
    total = cfg.blocks * (conv + gate + dft)
    return {"per_block": per_block, "cnn": cfg.blocks * (conv + gate),
            "dft": cfg.blocks * dft, "total": total, "ny": ny}


def resolve_config(variant_or_cfg, variants: dict, config_class):
    """A fresh config from a variant name, a dict of fields or a config instance."""
    if isinstance(variant_or_cfg, str):
        variant_or_cfg = variants[variant_or_cfg]
    if isinstance(variant_or_cfg, dict):
        return config_class(**variant_or_cfg)
    return config_class(**asdict(variant_or_cfg))


def build(variant_or_cfg: str | dict | PisfConfig) -> PisfNet:
    return PisfNet(resolve_config(variant_or_cfg, VARIANTS, PisfConfig))

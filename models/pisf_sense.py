"""PISF v2: the scan-calibrated unrolled 1D network (torch; training and export only).

One row is one readout position x of a slice after the readout iFFT: the measured hybrid
k-space along phase encoding y_c[ky] of C (virtual) coils, the row's sampling mask m[ky] and
the row's coil sensitivities s_c[y] (ESPIRiT maps from the scan's own reference lines, computed
by the runtime in numpy: gadgets/numerics/calibration.py). With the forward model
y_c = M F (s_c * x), SENSE is separable across rows, so every row is a small ny-unknown problem:

    normal matrix  N = A^H A = P o G,   P[i, j] = (F^H M F)[i, j] = p[(i - j) mod ny]  (circulant)
                                        G[i, j] = sum_c conj(s_c[i]) s_c[j]
    right side     b = A^H y = sum_c conj(s_c) F^H y_c

The graph builds N and b (any coil count C, any ny), starts from two Tikhonov-regularised SENSE
solutions (conjugate gradients; light and strong weight, both seen by every block), then runs
unrolled blocks: a learned 1D regulariser (the PISF
block: convs along y, residual units, learned soft threshold) proposes z, and the data
consistency solves (N + mu I) x = b + mu z by a few CG steps (mu learned per block). The image
is one complex channel pair (real, imag), so the network does not depend on the coil count.

All complex algebra is real arithmetic (ONNX has no complex tensors); CG loops are unrolled with
a fixed iteration count, so the exported graph is a plain feed-forward graph.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.pisf_net import (ResidualUnit, SoftThreshold, centred_dft_parts,  # noqa: F401  (shared parts)
                             parameter_count, resolve_config)


@dataclass
class SenseNetConfig:
    blocks: int = 5          # unrolled regulariser + data-consistency blocks
    features: int = 32       # F
    res_units: int = 2       # residual units before and after the soft threshold
    kernel: int = 3          # conv kernel along y
    init_cg: int = 8         # CG iterations of the initial SENSE solution
    block_cg: int = 4        # CG iterations of each block's data consistency
    init_lambda: float = 0.003   # Tikhonov weight of the sharp initial solution (learned), and
    smooth_lambda: float = 0.05  # of the smooth one; both, like mu, relative to mean diag(N)
    block_mu: float = 0.2        # initial mu of the blocks (learned)

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS = {
    "sense": SenseNetConfig(),
    "sense_fast": SenseNetConfig(blocks=3, features=16, res_units=1, block_cg=4),
    "sense_large": SenseNetConfig(blocks=8, features=48, res_units=2, block_cg=5),
}


# ----------------------------------------------------------------------------- complex helpers
def split(t: torch.Tensor):
    """[N, 2C, ny] (C real parts, then C imaginary parts) -> (re, im) each [N, C, ny]; any C
    (the reshape keeps the coil count dynamic in the exported graph)."""
    pairs = t.reshape(t.shape[0], 2, -1, t.shape[-1])
    return pairs[:, 0], pairs[:, 1]


def inverse_dft(re, im, cos, sin):
    """Centred orthonormal iDFT along the last axis: x = y (cos + i sin)."""
    return re @ cos - im @ sin, re @ sin + im @ cos


def normal_system(kspace: torch.Tensor, mask: torch.Tensor, sens: torch.Tensor):
    """N (re, im) [N, ny, ny] and b (re, im) [N, ny] of every row."""
    ny = kspace.shape[-1]
    index = torch.arange(ny, device=kspace.device)
    cos, sin = centred_dft_parts(index, kspace.dtype)
    y_re, y_im = split(kspace * mask)
    s_re, s_im = split(sens)
    c_re, c_im = inverse_dft(y_re, y_im, cos, sin)                  # coil images [N, C, ny]
    b_re = (s_re * c_re + s_im * c_im).sum(1)                      # sum conj(s) c
    b_im = (s_re * c_im - s_im * c_re).sum(1)
    # P[i, j] = (F^H M F)[i, j] = p[(i - j) mod ny],  p[d] = (1/ny) sum_k m_k exp(+i 2 pi (k - ny//2) d / ny)
    count = index[-1:] + 1
    shifted = index - torch.div(count, 2, rounding_mode="floor")
    angle = torch.remainder(shifted[:, None] * index[None, :], count).to(kspace.dtype) * (2.0 * math.pi) / count.to(kspace.dtype)
    m = mask[:, 0] / count.to(kspace.dtype)                         # [N, ny]
    p_re, p_im = m @ torch.cos(angle), m @ torch.sin(angle)         # [N, ny] over d
    diff = torch.remainder(index[:, None] - index[None, :] + count, count)
    pm_re, pm_im = p_re[:, diff], p_im[:, diff]                     # [N, ny, ny]
    # G[i, j] = sum_c conj(s_c[i]) s_c[j]
    st_re, st_im = s_re.transpose(1, 2), s_im.transpose(1, 2)        # [N, ny, C]
    g_re = st_re @ s_re + st_im @ s_im
    g_im = st_re @ s_im - st_im @ s_re
    n_re = pm_re * g_re - pm_im * g_im
    n_im = pm_re * g_im + pm_im * g_re
    return (n_re, n_im), (b_re, b_im)


def apply_normal(n, x_re, x_im, mu):
    """(N + mu I) x for rows: x [N, ny]."""
    n_re, n_im = n
    xr, xi = x_re[..., None], x_im[..., None]
    out_re = (n_re @ xr - n_im @ xi)[..., 0] + mu * x_re
    out_im = (n_re @ xi + n_im @ xr)[..., 0] + mu * x_im
    return out_re, out_im


def conjugate_gradient(n, rhs_re, rhs_im, x_re, x_im, mu, iterations: int):
    """Unrolled CG on (N + mu I) x = rhs per row (Hermitian positive definite for mu > 0)."""
    eps = 1e-12
    ar, ai = apply_normal(n, x_re, x_im, mu)
    r_re, r_im = rhs_re - ar, rhs_im - ai
    p_re, p_im = r_re, r_im
    rs = (r_re * r_re + r_im * r_im).sum(-1, keepdim=True)
    for _ in range(iterations):
        ap_re, ap_im = apply_normal(n, p_re, p_im, mu)
        curvature = (p_re * ap_re + p_im * ap_im).sum(-1, keepdim=True)
        alpha = rs / (curvature + eps)
        x_re, x_im = x_re + alpha * p_re, x_im + alpha * p_im
        r_re, r_im = r_re - alpha * ap_re, r_im - alpha * ap_im
        rs_new = (r_re * r_re + r_im * r_im).sum(-1, keepdim=True)
        beta = rs_new / (rs + eps)
        p_re, p_im = r_re + beta * p_re, r_im + beta * p_im
        rs = rs_new
    return x_re, x_im


# ----------------------------------------------------------------------------- regulariser
class Regulariser(nn.Module):
    """Inputs: current image (2 ch) and the two initial SENSE images (lightly and strongly
    regularised, 2 ch each: how much they differ tells the noise amplification); output: the
    proposed image."""

    def __init__(self, cfg: SenseNetConfig):
        super().__init__()
        feats, k = cfg.features, cfg.kernel
        dil = [1 + (i % 2) for i in range(cfg.res_units)]         # 1, 2, 1, 2 ...: wider view
        self.head = nn.Conv1d(6, feats, k, padding=k // 2)
        self.before = nn.Sequential(*[ResidualUnit(feats, k, d) for d in dil])
        self.shrink = SoftThreshold(feats)
        self.after = nn.Sequential(*[ResidualUnit(feats, k, d) for d in dil])
        self.tail = nn.Conv1d(feats, 2, k, padding=k // 2)
        nn.init.zeros_(self.tail.weight)   # each block starts as the identity
        nn.init.zeros_(self.tail.bias)

    def forward(self, image, initial):
        h = self.after(self.shrink(self.before(self.head(torch.cat([image, initial], 1)))))
        return image + self.tail(h)


def mean_diagonal(mask: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """Mean of diag(N) per row [N, 1] = sampled fraction x mean sum_c |s_c|^2: the scale that
    makes lambda and mu mean the same at any acceleration and coil count."""
    s_re, s_im = split(sens)
    return mask[:, 0].mean(-1, keepdim=True) * (s_re * s_re + s_im * s_im).sum(1).mean(-1, keepdim=True) + 1e-6


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class PisfSenseNet(nn.Module):
    def __init__(self, cfg: SenseNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or SenseNetConfig()
        self.blocks = nn.ModuleList(Regulariser(self.cfg) for _ in range(self.cfg.blocks))
        self.init_lambda = nn.Parameter(torch.tensor(inverse_softplus(self.cfg.init_lambda)))
        self.smooth_lambda = nn.Parameter(torch.tensor(inverse_softplus(self.cfg.smooth_lambda)))
        self.block_mu = nn.Parameter(torch.full((self.cfg.blocks,), inverse_softplus(self.cfg.block_mu)))

    def forward(self, kspace, mask, sens, return_all: bool = False):
        """kspace, sens [rows, 2C, ny]; mask [rows, 1, ny] -> image [rows, 2, ny] (re, im)."""
        n, (b_re, b_im) = normal_system(kspace, mask, sens)
        scale = mean_diagonal(mask, sens)
        zeros = torch.zeros_like(b_re)
        starts = []
        for weight in (self.init_lambda, self.smooth_lambda):
            lam = nn.functional.softplus(weight) * scale
            x_re, x_im = conjugate_gradient(n, b_re, b_im, zeros, zeros, lam, self.cfg.init_cg)
            starts.append(torch.stack([x_re, x_im], 1))
        image = starts[0]
        initial = torch.cat(starts, 1)
        outputs = [image]
        mus = nn.functional.softplus(self.block_mu)
        for k, block in enumerate(self.blocks):
            proposal = block(image, initial)
            mu = mus[k] * scale
            z_re, z_im = proposal[:, 0], proposal[:, 1]
            x_re, x_im = conjugate_gradient(n, b_re + mu * z_re, b_im + mu * z_im, z_re, z_im, mu,
                                            self.cfg.block_cg)
            image = torch.stack([x_re, x_im], 1)
            outputs.append(image)
        return outputs if return_all else image


def build(variant_or_cfg: str | dict | SenseNetConfig) -> PisfSenseNet:
    return PisfSenseNet(resolve_config(variant_or_cfg, VARIANTS, SenseNetConfig))

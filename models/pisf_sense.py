"""PISF v2: the scan-calibrated unrolled 1D network (torch; training and export only).

One row is one readout position x of a slice after the readout iFFT: the measured hybrid
k-space along phase encoding y_c[ky] of C (virtual) coils, the row's sampling mask m[ky] and
the row's coil sensitivities s_c[y] (ESPIRiT maps from the scan's own reference lines, computed
by the runtime in numpy: gadgets/numerics/calibration.py). With the forward model
y_c = M F (s_c * x), SENSE is separable across rows, so every row is a small ny-unknown problem:

    normal matrix  N = A^H A = P o G,   P[i, j] = (F^H M F)[i, j] = p[(i - j) mod ny]  (circulant)
                                        G[i, j] = sum_c conj(s_c[i]) s_c[j]
    right side     b = A^H y = sum_c conj(s_c) F^H y_c

The network builds b and the normal operator (any coil count C, any ny), starts from two
Tikhonov-regularised SENSE
solutions (conjugate gradients; light and strong weight, both seen by every block), then runs
unrolled blocks: a learned 1D regulariser (the PISF
block: convs along y, residual units, learned soft threshold) proposes z, and the data
consistency solves (N + mu I) x = b + mu z by a few CG steps (mu learned per block). The image
is one complex channel pair (real, imag), so the network does not depend on the coil count.

Two forms of the same normal operator (PisfSenseNet.normal_form):
- "fft" (PISF v3, training and contract 3): N x = sum_c conj(s_c) iFFTc(m FFTc(s_c x)) with
  torch.fft, O(C ny log ny) per row; the runtime does the same in numpy
  (gadgets/numerics/sense_rows.py) and the ONNX file holds only the regularisers (models/pisf_v3.py).
- "dense" (PISF v2, contract 2 export and tests): the per-row matrices P o G above as real
  arithmetic (ONNX has no complex tensors), O(ny^2) per row, built inside the graph.
CG loops are unrolled with a fixed iteration count in both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

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
    """Unrolled CG on (N + mu I) x = rhs per row with the dense N of `normal_system`."""
    return unrolled_cg(lambda p_re, p_im: apply_normal(n, p_re, p_im, mu), rhs_re, rhs_im, x_re, x_im, iterations)


def unrolled_cg(apply, rhs_re, rhs_im, x_re, x_im, iterations: int):
    """Unrolled CG on A x = rhs per row, A Hermitian positive definite given as
    apply(x_re, x_im) -> (re, im) on [N, ny]; x starts at (x_re, x_im)."""
    eps = 1e-12
    ar, ai = apply(x_re, x_im)
    r_re, r_im = rhs_re - ar, rhs_im - ai
    p_re, p_im = r_re, r_im
    rs = (r_re * r_re + r_im * r_im).sum(-1, keepdim=True)
    for _ in range(iterations):
        ap_re, ap_im = apply(p_re, p_im)
        curvature = (p_re * ap_re + p_im * ap_im).sum(-1, keepdim=True)
        alpha = rs / (curvature + eps)
        x_re, x_im = x_re + alpha * p_re, x_im + alpha * p_im
        r_re, r_im = r_re - alpha * ap_re, r_im - alpha * ap_im
        rs_new = (r_re * r_re + r_im * r_im).sum(-1, keepdim=True)
        beta = rs_new / (rs + eps)
        p_re, p_im = r_re + beta * p_re, r_im + beta * p_im
        rs = rs_new
    return x_re, x_im


class FftNormal:
    """The SENSE normal operator of rows through FFTs along ky (no ny x ny matrices):

        N x = sum_c conj(s_c) iFFTc(m FFTc(s_c x)),   b = sum_c conj(s_c) iFFTc(m y_c)

    iFFTc(m FFTc(u)) = fftshift(ifft(m' fft(ifftshift(u)))) with m' = ifftshift(m), and the
    shift commutes with the coil sum, so maps and mask are shifted once and every application
    shifts only x and the result. ifft(fft(.)) with numpy/torch default norms is the orthonormal
    pair. Same operator as `normal_system` (tests/test_pisf_v3.py)."""

    def __init__(self, kspace: torch.Tensor, mask: torch.Tensor, sens: torch.Tensor):
        s_re, s_im = split(sens)
        y_re, y_im = split(kspace * mask)
        self.maps = torch.fft.ifftshift(torch.complex(s_re, s_im), dim=-1)       # [N, C, ny]
        self.mask = torch.fft.ifftshift(mask, dim=-1)                            # [N, 1, ny]
        shifted = torch.fft.ifftshift(torch.complex(y_re, y_im), dim=-1)
        rhs = torch.fft.fftshift((self.maps.conj() * torch.fft.ifft(shifted, dim=-1, norm="ortho")).sum(1), dim=-1)
        self.rhs = rhs.real, rhs.imag

    def apply(self, x_re, x_im, shift):
        """(N + shift I) x for rows [N, ny]; shift [N, 1] or a scalar."""
        x = torch.fft.ifftshift(torch.complex(x_re, x_im), dim=-1)[:, None]
        coil = torch.fft.ifft(self.mask * torch.fft.fft(self.maps * x, dim=-1), dim=-1)
        out = torch.fft.fftshift((self.maps.conj() * coil).sum(1), dim=-1)
        return out.real + shift * x_re, out.imag + shift * x_im


class DenseNormal:
    """The same operator as per-row matrices N = P o G (PISF v2's graph; ONNX-exportable)."""

    def __init__(self, kspace: torch.Tensor, mask: torch.Tensor, sens: torch.Tensor):
        self.matrix, self.rhs = normal_system(kspace, mask, sens)

    def apply(self, x_re, x_im, shift):
        return apply_normal(self.matrix, x_re, x_im, shift)


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

    # "fft" (training, contract 3) or "dense" (contract 2 export: the ONNX graph holds N);
    # the same function up to float error. Not saved in checkpoints.
    normal_form: str = "fft"

    def forward(self, kspace, mask, sens, return_all: bool = False):
        """kspace, sens [rows, 2C, ny]; mask [rows, 1, ny] -> image [rows, 2, ny] (re, im)."""
        # an ONNX export of the whole network is contract 2, whose graph holds N (ONNX's DFT op is
        # slow on onnxruntime's CPU provider and missing on CUDA)
        dense = self.normal_form == "dense" or torch.onnx.is_in_onnx_export()
        system = (DenseNormal if dense else FftNormal)(kspace, mask, sens)
        b_re, b_im = system.rhs
        scale = mean_diagonal(mask, sens)
        zeros = torch.zeros_like(b_re)
        starts = []
        for weight in (self.init_lambda, self.smooth_lambda):
            lam = nn.functional.softplus(weight) * scale
            x_re, x_im = unrolled_cg(partial(system.apply, shift=lam), b_re, b_im, zeros, zeros, self.cfg.init_cg)
            starts.append(torch.stack([x_re, x_im], 1))
        image = starts[0]
        initial = torch.cat(starts, 1)
        outputs = [image]
        mus = nn.functional.softplus(self.block_mu)
        for k, block in enumerate(self.blocks):
            proposal = block(image, initial)
            mu = mus[k] * scale
            z_re, z_im = proposal[:, 0], proposal[:, 1]
            x_re, x_im = unrolled_cg(partial(system.apply, shift=mu),
                                     b_re + mu * z_re, b_im + mu * z_im, z_re, z_im, self.cfg.block_cg)
            image = torch.stack([x_re, x_im], 1)
            outputs.append(image)
        return outputs if return_all else image


def build(variant_or_cfg: str | dict | SenseNetConfig) -> PisfSenseNet:
    return PisfSenseNet(resolve_config(variant_or_cfg, VARIANTS, SenseNetConfig))

"""Physics-informed synthetic 1D training data for PISF, generated on the fly (torch, CPU or CUDA).

One batch is a set of small "slabs": each slab is `rows_per_slice` readout positions x spread over
the whole field of view of one synthetic 2D slice, so per-slice quantities of the runtime (coil
compression from the ACS lines of all rows, normalisation by the max of the zero-filled coil
images of the slice) are computed over many rows together exactly as `gadgets/numerics/coils.py` does,
and individual rows see the realistic spread of energies (most rows have max < 1).

Recipe per slice:
  source image (natural grey-scale images bundled with scikit-image, Shepp-Logan and random
  ellipse phantoms, piecewise bands with smooth structure and texture), random affine, optional
  body-shaped support -> tissue PD/T1/T2 by random piecewise-linear look-up of the grey level ->
  SE or GRE signal equation at random TR/TE/flip -> smooth background phase + off-resonance
  phase (2 pi df TE) -> sensitivities of 4..32 physical loop coils (two-wire Biot-Savart
  cross-section of rectangular loops on an ellipse around the object) -> centred FFT along ky ->
  correlated complex noise at a random SNR -> 1D mask (equispaced / uniform random / variable
  density, R 2..10, 4..32 ACS lines, sometimes partial Fourier) -> SVD compression to C virtual
  coils from the ACS lines -> normalisation -> network rows.
Hybrid (x, ky) data is synthesised directly: the readout iFFT is unitary, so white k-space noise
stays white and the compression matrix from the ACS lines is the same as from k-space.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from gadgets.numerics.reference import MIN_ACS_BLOCK_LINES
from tools.rawdata.masks import centre_block

NATURAL_IMAGES = ("camera", "brick", "grass", "gravel", "moon", "coffee", "astronaut", "retina",
                  "text", "page", "coins", "cell", "chelsea", "hubble_deep_field", "rocket",
                  "horse", "clock")
PHANTOM_IMAGES = ("shepp_logan_phantom",)
IMAGE_SIZE = 512


@dataclass
class SynthConfig:
    coils: int = 8                          # C, virtual coils seen by the network
    ny_range: tuple = (64, 512)             # row length, drawn per batch
    pixels_per_batch: int = 24576           # rows * ny, keeps the cost per step constant
    rows_per_slice: int = 16                # rows of one slab, spread over the FOV
    physical_coils: tuple = (4, 32)
    acceleration: tuple = (2.0, 10.0)       # R = ny / sampled lines (ACS included)
    acs_lines: tuple = (4, 32)
    snr: tuple = (8.0, 400.0)               # log-uniform: rms coil signal / per-coil noise std
    partial_fourier_prob: float = 0.15
    partial_fourier_range: tuple = (0.6, 0.85)
    mask_probs: dict = field(default_factory=lambda: {"equispaced": 0.4, "random": 0.3,
                                                      "variable_density": 0.3})
    source_probs: dict = field(default_factory=lambda: {"natural": 0.55, "phantom": 0.2,
                                                        "piecewise": 0.25})
    support_prob: float = 0.75              # body-shaped support with background zero
    # runtime scale = max over the whole slice >= max over the slab: divide by an extra factor
    slab_max_fraction: tuple = (0.6, 1.0)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SynthConfig":
        d = dict(d or {})
        for key in ("ny_range", "physical_coils", "acceleration", "acs_lines", "snr",
                    "partial_fourier_range", "slab_max_fraction"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- centred FFTs
def fftc(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(x, dim), dim=dim, norm="ortho"), dim)


def ifftc(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(x, dim), dim=dim, norm="ortho"), dim)


# ----------------------------------------------------------------------------- source images
_IMAGE_CACHE: dict = {}


def load_images(names=NATURAL_IMAGES, size: int = IMAGE_SIZE) -> np.ndarray:
    """Grey-scale images bundled in the scikit-image wheel, [N, size, size] float32 in [0, 1]."""
    key = (tuple(names), size)
    if key not in _IMAGE_CACHE:
        import skimage.data
        from skimage.color import rgb2gray
        from skimage.transform import resize
        stack = []
        for name in names:
            try:
                img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
            except Exception:   # an image missing from this skimage build: skip it
                continue
            if img.ndim == 3:
                img = rgb2gray(img[..., :3] / (255.0 if img.max() > 1 else 1.0))
            img = resize(img, (size, size), anti_aliasing=True)
            img = (img - img.min()) / max(img.max() - img.min(), 1e-8)
            stack.append(img.astype(np.float32))
        _IMAGE_CACHE[key] = np.stack(stack)
    return _IMAGE_CACHE[key]


# ----------------------------------------------------------------------------- masks
def calibration_lines_torch(mask: torch.Tensor) -> torch.Tensor:
    """Boolean [B, ny]: the contiguous sampled run through the centre (the ACS block) when it has
    >= MIN_ACS_BLOCK_LINES lines, otherwise every sampled line. Mirrors
    gadgets.numerics.pisf_inference.calibration_lines."""
    ny = mask.shape[-1]
    sampled = mask > 0.5
    centre = ny // 2
    index = torch.arange(ny, device=mask.device)
    # distance to the nearest unsampled line on each side of the centre
    unsampled = ~sampled
    big = ny + 1
    left_gap = torch.where(unsampled & (index <= centre), index, torch.full_like(index, -1)).amax(-1)
    right_gap = torch.where(unsampled & (index >= centre), index, torch.full_like(index, big)).amin(-1)
    run = (index[None] > left_gap[:, None]) & (index[None] < right_gap[:, None])
    use_run = run.sum(-1, keepdim=True) >= MIN_ACS_BLOCK_LINES
    return torch.where(use_run, run, sampled)


def make_masks(batch: int, ny: int, cfg: SynthConfig, gen: torch.Generator,
               kind: str | None = None, acceleration=None, acs=None,
               partial_fourier: bool | None = None) -> tuple[torch.Tensor, dict]:
    """1D sampling masks [batch, ny] (float32, CPU) and their parameters.

    R counts ACS lines: round(ny / R) lines are sampled in total (before partial Fourier).
    """
    kinds = list(cfg.mask_probs)
    kind_probs = torch.tensor([cfg.mask_probs[k] for k in kinds])
    masks = torch.zeros(batch, ny)
    info = {"kind": [], "acceleration": [], "acs": [], "partial_fourier": []}
    for b in range(batch):
        k = kind or kinds[int(torch.multinomial(kind_probs, 1, generator=gen))]
        r = float(acceleration if acceleration is not None else
                  cfg.acceleration[0] + (cfg.acceleration[1] - cfg.acceleration[0]) * torch.rand(1, generator=gen))
        total = max(1, round(ny / r))
        n_acs = int(acs if acs is not None else
                    torch.randint(cfg.acs_lines[0], cfg.acs_lines[1] + 1, (1,), generator=gen))
        n_acs = max(2, min(n_acs, total, ny))
        block = centre_block(ny, n_acs)
        start = int(np.argmax(block))
        row = torch.from_numpy(block.astype(np.float32))
        outer = torch.nonzero(row == 0).flatten()
        n_outer = total - n_acs
        if n_outer > 0:
            if k == "equispaced":
                spacing = (ny - n_acs) / n_outer
                offset = float(torch.rand(1, generator=gen)) * spacing
                picks = torch.floor(offset + spacing * torch.arange(n_outer)).long().clamp(max=len(outer) - 1)
                chosen = outer[picks]
            else:
                if k == "random":
                    weights = torch.ones(len(outer))
                else:   # variable density: polynomial decay with distance from the centre
                    distance = (outer.float() - ny / 2).abs() / (ny / 2)
                    power = 1.0 + 3.0 * float(torch.rand(1, generator=gen))
                    weights = (1.0 - distance).clamp(min=0.02) ** power
                chosen = outer[torch.multinomial(weights, n_outer, replacement=False, generator=gen)]
            row[chosen] = 1
        pf = (partial_fourier if partial_fourier is not None else
              bool(torch.rand(1, generator=gen) < cfg.partial_fourier_prob))
        if pf:
            lo, hi = cfg.partial_fourier_range
            keep = int(round(ny * (lo + (hi - lo) * float(torch.rand(1, generator=gen)))))
            keep = max(keep, start + n_acs, ny - start)   # never cut the ACS block
            if torch.rand(1, generator=gen) < 0.5:
                row[: ny - keep] = 0
            else:
                row[keep:] = 0
        masks[b] = row
        info["kind"].append(k)
        info["acceleration"].append(r)
        info["acs"].append(n_acs)
        info["partial_fourier"].append(pf)
    return masks, info


# ----------------------------------------------------------------------------- coil model
def loop_coil_sensitivities(x: torch.Tensor, y: torch.Tensor, n_coils: torch.Tensor,
                            max_coils: int, gen: torch.Generator) -> torch.Tensor:
    """Complex sensitivities [B, max_coils, rows, ny]; coils >= n_coils[b] are zero.

    Each coil is a rectangular loop long along z, seen in the slice as two antiparallel wires on
    an ellipse around the object (2D Biot-Savart, B ~ z x r / |r|^2); a random z-offset of the
    loop softens and weakens its field. Receive sensitivity ~ Bx - i By, times a random phase.
    x: [B, rows, 1], y: [1, 1, ny] in FOV units ([-1, 1]).
    """
    batch, device = x.shape[0], x.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    coil = torch.arange(max_coils, device=device)[None].float()
    active = coil < n_coils[:, None].float()
    nc = n_coils[:, None].float()
    # spread over the full circle, or over an arc only (e.g. a posterior spine array)
    arc = torch.where(rand(batch, 1) < 0.25, (0.6 + 0.6 * rand(batch, 1)) * math.pi,
                      torch.full((batch, 1), 2 * math.pi, device=device))
    start = rand(batch, 1) * 2 * math.pi
    angle = start + arc * (coil + 0.5) / nc + (rand(batch, max_coils) - 0.5) * 0.3 * arc / nc
    radius_x = 1.05 + 0.5 * rand(batch, 1)
    radius_y = 1.05 + 0.5 * rand(batch, 1)
    centre_x, centre_y = radius_x * torch.cos(angle), radius_y * torch.sin(angle)
    tangent = torch.stack([-torch.sin(angle), torch.cos(angle)], -1)
    half_width = (0.1 + 0.25 * rand(batch, max_coils))[..., None]
    z_offset2 = ((0.05 + 0.5 * rand(batch, max_coils)) ** 2)[..., None, None]
    wires = [(centre_x + sign * half_width[..., 0] * tangent[..., 0],
              centre_y + sign * half_width[..., 0] * tangent[..., 1], sign) for sign in (1.0, -1.0)]
    bx = torch.zeros(batch, max_coils, x.shape[1], y.shape[2], device=device)
    by = torch.zeros_like(bx)
    for wx, wy, current in wires:
        rx = x[:, None] - wx[..., None, None]
        ry = y[:, None] - wy[..., None, None]
        r2 = rx * rx + ry * ry + z_offset2
        bx = bx - current * ry / r2
        by = by + current * rx / r2
    phase = rand(batch, max_coils)[..., None, None] * 2 * math.pi
    sens = torch.complex(bx, -by) * torch.exp(1j * phase)
    sens = sens * active[..., None, None]
    # unit peak of the root-sum-of-squares over the slab
    rss = sens.abs().pow(2).sum(1).sqrt().amax(dim=(-2, -1))
    return sens / rss[:, None, None, None].clamp(min=1e-12)


def correlated_noise(shape, n_coils: torch.Tensor, gen: torch.Generator, device) -> torch.Tensor:
    """Complex noise [B, coils, ...] with random inter-coil correlation; mean per-coil variance
    over the active coils is 1, inactive coils get none."""
    batch, coils = shape[0], shape[1]
    active = (torch.arange(coils)[None] < n_coils.cpu()[:, None]).float()
    mixing = torch.complex(torch.randn(batch, coils, coils, generator=gen),
                           torch.randn(batch, coils, coils, generator=gen)) / math.sqrt(2 * coils)
    strength = 0.6 * torch.rand(batch, 1, 1, generator=gen)
    gains = 0.7 + 0.6 * torch.rand(batch, coils, 1, generator=gen)
    lower = gains * (torch.eye(coils) + strength * mixing)
    lower = lower * active[:, :, None] * active[:, None, :]
    variance = (lower.abs() ** 2).sum(-1)                        # diag of L L^H
    mean_var = (variance * active).sum(-1) / active.sum(-1)
    lower = lower / mean_var.sqrt()[:, None, None]
    white = torch.complex(torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen))
    white = white / math.sqrt(2)
    noise = torch.einsum("bcd,bd...->bc...", lower, white)
    return noise.to(device)


# ----------------------------------------------------------------------------- preprocessing
def compression_matrices(hybrid: torch.Tensor, calibration: torch.Tensor, n_coils: torch.Tensor,
                         virtual_coils: int) -> torch.Tensor:
    """P [B, C, coils] = U[:, :C]^H of the calibration samples (rows x calibration ky), the
    torch mirror of gadgets.numerics.coils.coil_compression_matrix (equal up to a phase per virtual
    coil, the SVD's own ambiguity). hybrid [B, coils, rows, ny]; calibration bool [B, ny]."""
    data = hybrid.to(torch.complex128) * calibration[:, None, None, :]
    covariance = torch.einsum("bcrk,bdrk->bcd", data, data.conj())   # A A^H: same U as svd(A)
    _, vectors = torch.linalg.eigh(covariance)                        # ascending eigenvalues
    top = vectors.flip(-1)[..., :virtual_coils]                       # [B, coils, C]
    matrix = top.conj().transpose(-1, -2)
    kept = torch.minimum(n_coils.to(hybrid.device), torch.tensor(virtual_coils, device=hybrid.device))
    keep_row = torch.arange(virtual_coils, device=hybrid.device)[None] < kept[:, None]
    if matrix.shape[1] < virtual_coils:                               # fewer stored coils than C
        pad = matrix.new_zeros(matrix.shape[0], virtual_coils - matrix.shape[1], matrix.shape[2])
        matrix = torch.cat([matrix, pad], 1)
    matrix = matrix * keep_row[..., None]                             # zero-pad fewer coils
    return matrix.to(torch.complex64)


def compress(hybrid: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bvc,bc...->bv...", matrix, hybrid)


def normalisation_scales(hybrid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max |zero-filled coil image| per slice, [B]; mirrors gadgets.numerics.coils.normalisation_scale
    (the readout iFFT is unitary per row, so the max over rows of the 1D zero-filled images
    equals the 2D one)."""
    images = ifftc(hybrid * mask[:, None, None, :], -1)
    scale = images.abs().amax(dim=(1, 2, 3))
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def to_rows(hybrid: torch.Tensor) -> torch.Tensor:
    """[B, C, rows, ny] complex -> [B*rows, 2C, ny] float32 (real parts, then imaginary)."""
    b, c, r, ny = hybrid.shape
    stacked = torch.cat([hybrid.real, hybrid.imag], 1)             # [B, 2C, rows, ny]
    return stacked.permute(0, 2, 1, 3).reshape(b * r, 2 * c, ny).float()


def preprocess(noisy_hybrid: torch.Tensor, mask: torch.Tensor, n_coils: torch.Tensor,
               virtual_coils: int, clean_hybrid: torch.Tensor | None = None,
               scale_factor: torch.Tensor | None = None):
    """The runtime preprocessing (CONTRACT.md) on synthetic hybrid data [B, coils, rows, ny].

    Returns network inputs [B*rows, 2C, ny], masks [B*rows, 1, ny], targets (clean data through
    the same compression and scale, or None), scale [B] and compression matrices.
    """
    measured = noisy_hybrid * mask[:, None, None, :]
    matrix = compression_matrices(measured, calibration_lines_torch(mask), n_coils, virtual_coils)
    compressed = compress(measured, matrix)
    scale = normalisation_scales(compressed, mask)
    if scale_factor is not None:
        scale = scale * scale_factor
    inputs = to_rows(compressed / scale[:, None, None, None])
    rows = noisy_hybrid.shape[2]
    row_mask = mask.repeat_interleave(rows, 0)[:, None, :].float()
    target = None
    if clean_hybrid is not None:
        target = to_rows(compress(clean_hybrid, matrix) / scale[:, None, None, None])
    return inputs, row_mask, target, scale, matrix


# ----------------------------------------------------------------------------- generator
class Synthesizer:
    """`batch()` returns a dict with `inputs`, `mask`, `target` ([rows, 2C or 1, ny], float32 on
    `device`) and per-slice parameters for tests and logs."""

    def __init__(self, cfg: SynthConfig | None = None, device="cpu", seed: int = 0):
        self.cfg = cfg or SynthConfig()
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)   # CPU generator: same draws on any device
        natural, phantoms = load_images(NATURAL_IMAGES), load_images(PHANTOM_IMAGES)
        images = np.concatenate([natural, phantoms])                       # phantoms last
        self.images = torch.from_numpy(images)[:, None].to(self.device)   # [N, 1, S, S]
        self.n_natural = len(natural)

    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.gen).to(self.device)

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.device)

    # ---- object
    def _sample_grid(self, x, y):
        """Random affine of the FOV coordinates -> image coordinates [B, rows, ny, 2]."""
        b = x.shape[0]
        theta = self._rand(b, 1, 1) * 2 * math.pi
        zoom = 0.5 + 0.9 * self._rand(b, 1, 1)          # <1 zooms into the image
        aspect = 0.8 + 0.4 * self._rand(b, 1, 1)
        shift_x, shift_y = (self._rand(b, 1, 1) - 0.5) * 0.6, (self._rand(b, 1, 1) - 0.5) * 0.6
        u = (torch.cos(theta) * x - torch.sin(theta) * y) * zoom * aspect + shift_x
        v = (torch.sin(theta) * x + torch.cos(theta) * y) * zoom / aspect + shift_y
        return torch.stack([u, v], -1)

    def _natural(self, grid, phantom: bool):
        b = grid.shape[0]
        if phantom:
            index = torch.full((b,), self.n_natural, dtype=torch.long)
        else:
            index = torch.randint(0, self.n_natural, (b,), generator=self.gen)
        images = self.images[index.to(self.device)]
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                            align_corners=False)
        return out[:, 0]

    def _ellipses(self, grid, count: int = 10):
        u, v = grid[..., 0][:, None], grid[..., 1][:, None]               # [B, 1, rows, ny]
        b = grid.shape[0]
        cx, cy = (self._rand(b, count, 1, 1) - 0.5) * 1.2, (self._rand(b, count, 1, 1) - 0.5) * 1.2
        ax, ay = 0.05 + 0.6 * self._rand(b, count, 1, 1), 0.05 + 0.6 * self._rand(b, count, 1, 1)
        phi = self._rand(b, count, 1, 1) * math.pi
        value = self._rand(b, count, 1, 1) * 2 - 0.6
        du, dv = u - cx, v - cy
        ru = (torch.cos(phi) * du + torch.sin(phi) * dv) / ax
        rv = (-torch.sin(phi) * du + torch.cos(phi) * dv) / ay
        inside = ((ru * ru + rv * rv) < 1).float()
        img = (inside * value).sum(1) + 1.0 * (self._rand(b, 1, 1) < 0.5)   # sometimes a base disc
        return img

    def _piecewise(self, grid, segments: int = 12):
        """Bands with random breakpoints along a random direction, bending slowly across rows."""
        u, v = grid[..., 0], grid[..., 1]
        b = grid.shape[0]
        breaks = torch.sort(self._rand(b, segments, 1, 1) * 2.4 - 1.2, dim=1).values
        bend = (self._rand(b, segments, 1, 1) - 0.5) * 0.6
        position = v[:, None] + bend * u[:, None] ** 2
        levels = self._rand(b, segments, 1, 1)
        steps = torch.diff(levels, dim=1, prepend=torch.zeros_like(levels[:, :1]))
        return (steps * (position > breaks).float()).sum(1)

    def _texture(self, shape):
        """Smooth structure (few cosines) times fine texture (filtered noise along ky)."""
        b, rows, ny = shape
        y = torch.linspace(-1, 1, ny, device=self.device)[None, None]
        freq = 0.5 + 3.0 * self._rand(b, 3, 1, 1)
        phase = self._rand(b, 3, 1, 1) * 2 * math.pi
        smooth = 1 + 0.15 * torch.cos(math.pi * freq * y[:, None] + phase).sum(1)
        noise = self._randn(b * rows, 1, ny)
        width = 5
        kernel = torch.ones(1, 1, width, device=self.device) / width
        fine = F.conv1d(noise, kernel, padding=width // 2).reshape(b, rows, ny)
        return smooth * (1 + 0.15 * self._rand(b, 1, 1) * fine)

    def _object(self, x, y):
        """Grey-level object in [0, 1] and support, both [B, rows, ny]."""
        b, rows, ny = x.shape[0], x.shape[1], y.shape[-1]
        grid = self._sample_grid(x, y)
        names = list(self.cfg.source_probs)
        probs = torch.tensor([self.cfg.source_probs[n] for n in names])
        kind = torch.multinomial(probs, b, replacement=True, generator=self.gen).to(self.device)
        natural = self._natural(grid, phantom=False)
        phantom = torch.where(self._rand(b, 1, 1) < 0.3, self._natural(grid, phantom=True),
                              self._ellipses(grid))
        piecewise = self._piecewise(grid)
        sources = {"natural": natural, "phantom": phantom, "piecewise": piecewise}
        img = torch.zeros(b, rows, ny, device=self.device)
        for i, name in enumerate(names):
            img = torch.where((kind == i)[:, None, None], sources[name], img)
        lo = img.amin(dim=(1, 2), keepdim=True)
        hi = img.amax(dim=(1, 2), keepdim=True)
        img = (img - lo) / (hi - lo).clamp(min=1e-6)
        textured = (kind != names.index("natural"))[:, None, None]
        img = torch.where(textured, img * self._texture((b, rows, ny)), img).clamp(0, 1.5)
        # body-shaped support (background is zero in MR), smooth edge
        cx, cy = (self._rand(b, 1, 1) - 0.5) * 0.2, (self._rand(b, 1, 1) - 0.5) * 0.2
        ax, ay = 0.55 + 0.4 * self._rand(b, 1, 1), 0.55 + 0.4 * self._rand(b, 1, 1)
        radius = torch.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
        support = torch.sigmoid((1 - radius) / 0.015)
        use_support = self._rand(b, 1, 1) < self.cfg.support_prob
        support = torch.where(use_support, support, torch.ones_like(support))
        return img, support

    # ---- physics
    def _signal(self, grey, support):
        """PD/T1/T2 from grey level by random piecewise-linear look-up; SE/GRE magnitude."""
        b = grey.shape[0]
        knots = 6
        pd = 0.2 + 0.8 * self._rand(b, knots)
        t1 = torch.exp(math.log(200) + (math.log(3000) - math.log(200)) * self._rand(b, knots))
        t2 = torch.exp(math.log(15) + (math.log(300) - math.log(15)) * self._rand(b, knots))
        position = grey.clamp(0, 1).reshape(b, -1) * (knots - 1)
        low = position.floor().long().clamp(max=knots - 2)
        frac = position - low

        def lookup(table):
            return (torch.gather(table, 1, low) * (1 - frac)
                    + torch.gather(table, 1, low + 1) * frac).reshape(grey.shape)

        pd_map, t1_map, t2_map = lookup(pd), lookup(t1), lookup(t2)
        tr = torch.exp(math.log(8) + (math.log(5000) - math.log(8)) * self._rand(b, 1, 1))
        gre = self._rand(b, 1, 1) < 0.5
        te = torch.where(gre, 2 + 28 * self._rand(b, 1, 1), 8 + 112 * self._rand(b, 1, 1))
        te = torch.minimum(te, 0.8 * tr)
        flip = torch.deg2rad(5 + 85 * self._rand(b, 1, 1))
        e1 = torch.exp(-tr / t1_map)
        t2star = t2_map * (0.3 + 0.7 * self._rand(b, 1, 1))
        se = pd_map * (1 - e1) * torch.exp(-te / t2_map)
        gre_signal = pd_map * torch.sin(flip) * (1 - e1) / (1 - torch.cos(flip) * e1) * torch.exp(-te / t2star)
        magnitude = torch.where(gre, gre_signal, se)
        # keep the image's own contrast sometimes (texture-rich, no tissue classes)
        magnitude = torch.where(self._rand(b, 1, 1) < 0.25, grey, magnitude)
        magnitude = magnitude * support
        peak = magnitude.amax(dim=(1, 2), keepdim=True).clamp(min=1e-8)
        return magnitude / peak, te

    def _phase(self, x, y, te):
        """Smooth background phase (quadratic) + off-resonance phase 2 pi df TE."""
        b = x.shape[0]
        c = (self._rand(b, 6, 1, 1) - 0.5) * 2
        background = (math.pi * c[:, 0] + 1.5 * c[:, 1] * x + 1.5 * c[:, 2] * y
                      + 1.0 * c[:, 3] * x * x + 1.0 * c[:, 4] * x * y + 1.0 * c[:, 5] * y * y)
        d = (self._rand(b, 4, 1, 1) - 0.5) * 2
        bump_x, bump_y = (self._rand(b, 1, 1) - 0.5), (self._rand(b, 1, 1) - 0.5)
        bump = torch.exp(-((x - bump_x) ** 2 + (y - bump_y) ** 2) / (0.02 + 0.1 * self._rand(b, 1, 1)))
        max_hz = 80 * self._rand(b, 1, 1)
        off_resonance = max_hz * (0.4 * d[:, 0] * x + 0.4 * d[:, 1] * y + 0.3 * d[:, 2] * x * y
                                  + 0.6 * d[:, 3] * bump)
        return background + 2 * math.pi * off_resonance * te / 1000.0

    def batch(self, ny: int | None = None, slices: int | None = None, snr=None, mask_kind=None,
              acceleration=None, acs=None, partial_fourier=None, n_coils=None,
              slab_max_jitter: bool = True, virtual_coils: int | None = None) -> dict:
        """virtual_coils: compress to this many coils instead of cfg.coils."""
        cfg = self.cfg
        if ny is None:
            ny = int(torch.randint(cfg.ny_range[0], cfg.ny_range[1] + 1, (1,), generator=self.gen))
        rows = cfg.rows_per_slice
        if slices is None:
            slices = max(1, cfg.pixels_per_batch // (ny * rows))
        b, dev = slices, self.device
        max_coils = cfg.physical_coils[1]
        # rows spread over the FOV (so the slab max approximates the slice max), jittered
        x = (torch.arange(rows, device=dev).float()[None] + self._rand(b, rows)) / rows * 2 - 1
        x = x[..., None]                                                   # [B, rows, 1]
        y = ((torch.arange(ny, device=dev).float() - ny // 2) / (ny / 2))[None, None]   # [1, 1, ny]

        grey, support = self._object(x, y)
        magnitude, te = self._signal(grey, support)
        image = magnitude * torch.exp(1j * self._phase(x, y, te))         # [B, rows, ny]

        if n_coils is None:
            coil_count = torch.randint(cfg.physical_coils[0], cfg.physical_coils[1] + 1, (b,),
                                       generator=self.gen)
        else:
            coil_count = torch.full((b,), int(n_coils))
        sens = loop_coil_sensitivities(x, y, coil_count.to(dev), max_coils, self.gen)
        coil_images = sens * image[:, None]                                # [B, coils, rows, ny]
        clean = fftc(coil_images, -1)

        if snr is None:
            lo, hi = math.log(cfg.snr[0]), math.log(cfg.snr[1])
            snr_value = torch.exp(lo + (hi - lo) * torch.rand(b, generator=self.gen))
        else:
            snr_value = torch.full((b,), float(snr))
        snr_value = snr_value.to(dev)
        active = (torch.arange(max_coils, device=dev)[None] < coil_count.to(dev)[:, None]).float()
        signal_power = (coil_images.abs() ** 2).mean(dim=(2, 3))           # [B, coils]
        signal_rms = torch.sqrt((signal_power * active).sum(1) / active.sum(1))
        sigma = signal_rms / snr_value
        noise = correlated_noise(clean.shape, coil_count, self.gen, dev)
        noisy = clean + sigma[:, None, None, None] * noise

        mask, mask_info = make_masks(b, ny, cfg, self.gen, kind=mask_kind, acceleration=acceleration,
                                     acs=acs, partial_fourier=partial_fourier)
        mask = mask.to(dev)
        factor = None
        if slab_max_jitter:
            lo, hi = cfg.slab_max_fraction
            factor = 1.0 / (lo + (hi - lo) * self._rand(b))
        inputs, row_mask, target, scale, matrix = preprocess(
            noisy, mask, coil_count, virtual_coils or cfg.coils, clean_hybrid=clean, scale_factor=factor)
        return {"inputs": inputs, "mask": row_mask, "target": target, "scale": scale,
                "slice_mask": mask, "mask_info": mask_info, "n_coils": coil_count,
                "snr": snr_value, "sigma": sigma, "noisy_hybrid": noisy, "clean_hybrid": clean,
                "compression": matrix, "sens": sens, "ny": ny, "rows_per_slice": rows}


# ----------------------------------------------------------------------------- v2 (scan-calibrated)
def separate_reference_masks(batch: int, ny: int, gen: torch.Generator, accelerations=(2, 6)) -> torch.Tensor:
    """Pure equispaced image masks [batch, ny] (every R-th line, random offset, no centre block):
    the image lines of a scan whose calibration lines come separately (reference scan)."""
    masks = torch.zeros(batch, ny)
    for b in range(batch):
        r = int(torch.randint(accelerations[0], accelerations[1] + 1, (1,), generator=gen))
        offset = int(torch.randint(0, r, (1,), generator=gen))
        masks[b, offset::r] = 1
    return masks


def smooth_noise(shape, gen: torch.Generator, width: int, device) -> torch.Tensor:
    """Complex Gaussian noise low-passed along the last axis (box filter of `width`)."""
    noise = torch.complex(torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)).to(device)
    kernel = torch.ones(1, 1, width, device=device) / math.sqrt(width)
    flat = noise.reshape(-1, 1, shape[-1])
    re = F.conv1d(flat.real, kernel, padding=width // 2)[..., :shape[-1]]
    im = F.conv1d(flat.imag, kernel, padding=width // 2)[..., :shape[-1]]
    return torch.complex(re, im).reshape(shape)


def sense_batch(synth: "Synthesizer", separate_reference_prob: float = 0.3,
                map_error: tuple = (0.0, 0.05), virtual_coil_choices: tuple = (8, 12, 16),
                separate_accelerations: tuple = (2, 4), few_coil_prob: float = 0.0,
                few_coils: tuple = (2, 3, 4, 6), **kwargs) -> dict:
    """A training batch for the scan-calibrated network (models/pisf_sense.py).

    Same physics as `Synthesizer.batch`; the runtime half (gadgets/numerics/pisf_inference.py)
    compresses coils on the reference lines, estimates ESPIRiT maps from them and normalises by
    the zero-filled maximum. Here the maps are the simulated virtual-coil sensitivities,
    normalised to unit root-sum-of-squares (as ESPIRiT's), with a smooth random error of
    `map_error` relative size (calibration from a few noisy reference lines is not exact).
    The target is the clean image the maps define: sum_c conj(s_c) * clean coil image_c.
    A fraction of slices get pure equispaced masks (separate reference lines, not image data).
    With probability `few_coil_prob` the whole batch comes from a receive array of one of
    `few_coils` channels, undersampled at most R = channels (SENSE stays well posed: a 4-channel
    scan at R <= 4, a 2-channel one at R <= 2), so the model learns what few coils allow instead of
    being refused them by the guard (PISF v1/v2 runs at R >= 4 on 4 coils taught hallucination).
    """
    if few_coil_prob > 0 and "n_coils" not in kwargs and \
            float(torch.rand(1, generator=synth.gen)) < few_coil_prob:
        coils = int(few_coils[int(torch.randint(len(few_coils), (1,), generator=synth.gen))])
        top = min(float(coils), float(synth.cfg.acceleration[1]))
        low = min(1.5, top)
        kwargs = dict(kwargs, n_coils=coils,
                      acceleration=low + (top - low) * float(torch.rand(1, generator=synth.gen)))
        separate_accelerations = (2, max(2, min(coils, int(separate_accelerations[1]))))
    # the runtime compresses to up to 16 virtual coils; vary the count the network sees
    virtual_coils = int(virtual_coil_choices[int(torch.randint(len(virtual_coil_choices), (1,), generator=synth.gen))])
    raw = synth.batch(virtual_coils=virtual_coils, **kwargs)
    dev, gen = synth.device, synth.gen
    b, ny, rows = raw["slice_mask"].shape[0], raw["ny"], raw["rows_per_slice"]
    mask = raw["slice_mask"].clone()
    separate = torch.rand(b, generator=gen) < separate_reference_prob
    if separate.any():
        mask[separate] = separate_reference_masks(int(separate.sum()), ny, gen,
                                                  tuple(separate_accelerations)).to(mask.device)
    matrix = raw["compression"]                                          # [B, C, coils]
    sens = compress(raw["sens"].to(torch.complex64), matrix)             # [B, C, rows, ny]
    size = torch.empty(b, 1, 1, 1).uniform_(*map_error, generator=gen).to(dev)
    error = smooth_noise(sens.shape, gen, max(3, ny // 16), dev)
    # error relative to each coil's own typical sensitivity (not to the RSS over coils: that
    # made a 8 % setting a ~30 % per-coil error and taught the network to distrust the maps)
    typical = sens.abs().pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
    sens = sens + size * error * typical
    sens = sens / sens.abs().pow(2).sum(1, keepdim=True).sqrt().clamp(min=1e-8)
    measured = compress(raw["noisy_hybrid"] * mask[:, None, None, :], matrix)
    scale = normalisation_scales(measured, mask)
    lo, hi = synth.cfg.slab_max_fraction
    scale = scale / (lo + (hi - lo) * torch.rand(b, generator=gen).to(dev))
    clean_images = ifftc(compress(raw["clean_hybrid"], matrix), -1)        # [B, C, rows, ny]
    target = (sens.conj() * clean_images).sum(1) / scale[:, None, None]    # [B, rows, ny]
    target_rows = torch.stack([target.real, target.imag], 2).reshape(b * rows, 2, ny).float()
    # every slice weighs the same in the loss, whatever its signal level (per-slice NMSE)
    energy = (target.abs() ** 2).mean(dim=(1, 2)).clamp(min=1e-12)
    row_weight = (1.0 / energy).repeat_interleave(rows)[:, None, None].float()
    return {"inputs": to_rows(measured / scale[:, None, None, None]), "row_weight": row_weight,
            "sens": to_rows(sens),
            "mask": mask.repeat_interleave(rows, 0)[:, None, :].float(),
            "target": target_rows, "ny": ny, "separate": separate, "snr": raw["snr"]}

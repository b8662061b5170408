"""What the data-dependent draws are computed from: the input patches a unit's filters see,
and their whitening (DESIGN 1.1; paper section 3.1).

Patches are gathered from the unit's real input so that padding, stride, dilation and
groups are exactly those of the forward pass, at most a budget of them, chosen before they
are materialised. The patch covariance (rows x dim^2) dominates the cost of a draw on a
CPU; the top principal directions of wide inputs come from a seeded randomised subspace
iteration rather than a full eigendecomposition (a full float64 `eigh` of 4608 x 4608
takes 15-60 s on two cores, the subspace iteration well under a second).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..device import one_thread

# Whitening. The reference adds an absolute 1e-3 to eigenvalues of an unnormalised scatter
# matrix (sum, not mean, over patches), which makes it scale-dependent and nearly zero. Here
# eps is relative to the mean eigenvalue (the average per-dimension variance): the draw is
# invariant to the input's scale (normalised images, deep features and loaded checkpoints
# differ by orders of magnitude), and a low-variance direction is amplified at most
# ~1/sqrt(EPS_REL) = 32x more than an average one, so k-means is not driven by noise.
EPS_REL = 1e-3
# A direction is usable when its eigenvalue exceeds RANK_REL * the largest one (the
# reference's absolute 1e-6 on a scatter matrix means "exactly zero"). On the CPU the
# covariance is accumulated in float32 (twice as fast as float64): the null direction of a
# LayerNorm output then measures ~1e-8 of the largest eigenvalue (up to 65536 rows), so 1e-5
# leaves a 1000x margin, and a real direction 1e5 times weaker than the top one carries
# nothing an initialisation needs. Unusable directions are never used as filters.
RANK_REL = 1e-5
# Inputs wider than this use the randomised subspace iteration for their top directions
# (when the directions wanted are at most half of the dimensions).
RANDOMIZED_MIN_DIM = 512
RANDOMIZED_POWER_ITERS = 2
# Column block of the blocked Gram matrix.
_GRAM_BLOCK = 256


class Fallback(Exception):
    """The data cannot support a data-dependent draw; the message says why."""


class Patches(NamedTuple):
    rows: torch.Tensor  # (groups, n, dim) float32; columns in (tap, channel) order
    taps: int  # kernel taps per channel (1 for a linear unit)
    positions: torch.Tensor | None  # flat (batch, output position) index of each row; None: all
    total: int  # positions available


def extract_patches(
    unit: nn.Module, x: torch.Tensor, budget: int, generator: torch.Generator
) -> Patches:
    """The rows the unit's filters see, at most `budget` of them, chosen before gathering.

    Positions are in order (batch, then output positions) when all are used. Conv rows come
    tap-major (all channels of tap 0, then tap 1, ...): that gathers contiguous channel
    vectors; `to_weight_order` turns filters back into the weight's (channel, tap) layout.
    """
    if isinstance(unit, nn.Linear):
        if x.dim() == 0 or x.shape[-1] != unit.in_features:
            raise Fallback(f"input of shape {tuple(x.shape)} does not match the unit")
        rows = x.reshape(-1, x.shape[-1])
        idx = choose(rows.shape[0], budget, generator)
        # a copy: the draws centre patches in place, and these rows are the unit's input
        rows = rows.clone() if idx is None else rows[idx.to(rows.device)]
        return Patches(rows.float().unsqueeze(0), 1, idx, x.numel() // x.shape[-1])
    if not isinstance(unit, _ConvNd) or unit.transposed:
        raise Fallback(f"no patch draw for {type(unit).__name__}")
    return _conv_patches(unit, x, budget, generator)


def choose(total: int, budget: int, generator: torch.Generator) -> torch.Tensor | None:
    """A sorted random subset of `budget` of `total` positions, or None for all of them."""
    if total <= budget:
        return None
    idx = torch.randperm(total, generator=generator, device=generator.device)[:budget]
    return idx.sort().values


def _conv_patches(
    unit: _ConvNd, x: torch.Tensor, budget: int, generator: torch.Generator
) -> Patches:
    """Gather conv patches straight from the unpadded input, one tap at a time.

    Padding is applied as a map of coordinates (zeros, reflect, replicate, circular), so
    neither a padded nor a channels-last copy of the whole input is made: on resnet50 those
    copies cost more than the gathers themselves.
    """
    nd = len(unit.kernel_size)
    if x.dim() == nd + 1:  # unbatched input, which torch convs accept
        x = x.unsqueeze(0)
    if x.dim() != nd + 2 or x.shape[1] != unit.in_channels:
        raise Fallback(f"input of shape {tuple(x.shape)} does not match the unit")
    kernel, stride, dilation = unit.kernel_size, unit.stride, unit.dilation
    size = x.shape[2:]
    lo, hi = _padding(unit, size)
    out = [(size[i] + lo[i] + hi[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
           for i in range(nd)]
    if min(out) < 1:
        raise Fallback(f"input smaller than the kernel ({tuple(size)})")
    total = x.shape[0] * math.prod(out)
    idx = choose(total, budget, generator)
    pos = torch.arange(total, device=x.device) if idx is None else idx.to(x.device)
    origin = []  # per spatial dim, the input coordinate of tap 0 (may lie in the padding)
    for i in reversed(range(nd)):
        origin.insert(0, (pos % out[i]) * stride[i] - lo[i])
        pos = pos // out[i]
    image = pos
    taps = list(itertools.product(*[range(k) for k in kernel]))
    buf = torch.empty(len(image), len(taps), x.shape[1], dtype=x.dtype, device=x.device)
    for j, tap in enumerate(taps):
        coords, inside = [], None
        for i in range(nd):
            c = origin[i] + tap[i] * dilation[i]
            if lo[i] == hi[i] == 0:  # never outside
                coords.append(c)
                continue
            c, ok = _source(c, size[i], unit.padding_mode)
            coords.append(c)
            if ok is not None:
                inside = ok if inside is None else inside & ok
        vals = x[(image, slice(None), *coords)]  # (n, C)
        if inside is not None:
            vals = vals.masked_fill(~inside.unsqueeze(1), 0)
        buf[:, j] = vals
    groups = unit.groups
    rows = buf.float().reshape(len(image), len(taps), groups, -1).permute(2, 0, 1, 3)
    return Patches(rows.reshape(groups, len(image), -1), len(taps), idx, total)


def _source(
    c: torch.Tensor, size: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where padded coordinate `c` reads from, and (zero padding) whether it is inside."""
    if mode == "zeros":
        return c.clamp(0, size - 1), (c >= 0) & (c < size)
    if mode == "replicate":
        return c.clamp(0, size - 1), None
    if mode == "circular":
        return torch.remainder(c, size), None
    c = c.abs()  # reflect: the edge pixel is not repeated
    return torch.where(c >= size, 2 * (size - 1) - c, c), None


def _padding(unit: _ConvNd, size: torch.Size) -> tuple[list[int], list[int]]:
    """Padding before and after each spatial dim, exactly as the unit's forward applies it."""
    nd = len(unit.kernel_size)
    kernel, stride, dilation = unit.kernel_size, unit.stride, unit.dilation
    lo, hi = [0] * nd, [0] * nd
    padding = unit.padding
    for i in range(nd):
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise Fallback(f"unsupported padding {padding!r}")
            total = dilation[i] * (kernel[i] - 1) if padding == "same" else 0
            lo[i], hi[i] = total // 2, total - total // 2  # torch's 'same': odd pixel at the end
        else:
            lo[i] = hi[i] = padding[i]
    if _dynamic_same(unit):  # timm's TF-style SAME, computed from the input size in forward
        if unit.padding_mode != "zeros" and any(lo + hi):
            raise Fallback("dynamic 'same' padding combined with non-zero padding")
        for i in range(nd):
            s = size[i]
            total = max((math.ceil(s / stride[i]) - 1) * stride[i]
                        + (kernel[i] - 1) * dilation[i] + 1 - s, 0)
            lo[i] += total // 2
            hi[i] += total - total // 2
    return lo, hi


def to_weight_order(w: torch.Tensor, taps: int) -> torch.Tensor:
    """Filters over (tap, channel) columns -> the weight's (channel, tap) layout."""
    if taps == 1:
        return w
    groups, k, dim = w.shape
    return w.reshape(groups, k, taps, dim // taps).transpose(2, 3).reshape(groups, k, dim)


def _dynamic_same(unit: nn.Module) -> bool:
    names = {c.__name__ for c in type(unit).__mro__}
    dynamic = getattr(unit, "same_pad", False) is True  # timm's StdConv2dSame and kin
    return dynamic or bool(names & {"Conv2dSame", "Conv2dSameExport"})


def whiten(
    patches: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre `patches` in place; return the whitening basis and which of its columns are real.

    basis (G, dim, k') has columns u_j / sqrt(lambda_j + eps) for the top k' = min(k, dim)
    principal directions, zero where lambda_j is below the rank cut (usable (G, k') False),
    so that `(x - mean) @ basis` are whitened coordinates.
    """
    groups, n, dim = patches.shape
    kk = min(k, dim)
    mean = patches.sum(1, dtype=torch.float64) / n
    if not bool(torch.isfinite(mean).all()):  # checked here, on the rows used: a full pass
        raise Fallback("non-finite input")  # over a large input costs more than the draw
    patches.sub_(mean.to(patches.dtype).unsqueeze(1))
    dev = patches.device
    # float64 where it is cheap (GPUs, where float32 matmuls may also run in TF32), float32 on
    # the CPU (half the time; see RANK_REL).
    work = torch.float64 if dev.type == "cuda" else torch.float32
    cov = _gram(patches.to(work)) / n
    if dev.type not in ("cpu", "cuda"):  # e.g. MPS has no eigh
        cov = cov.cpu()
    lam, vec = _top_eigen(cov, kk, generator)
    mean_lam = torch.diagonal(cov, dim1=1, dim2=2).double().mean(1, keepdim=True)
    eps = EPS_REL * mean_lam
    lam_max = lam[:, :1]
    usable = (lam > RANK_REL * lam_max) & (lam_max > 0)
    scale = torch.where(usable, 1.0 / torch.sqrt(lam.clamp_min(0) + eps).clamp_min(1e-300), 0.0)
    basis = (vec * scale.unsqueeze(1)).float().to(dev)
    return basis, usable.to(dev)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x per group, exactly symmetric. Wide inputs compute only the upper block triangle
    (about 30% faster on the CPU for dim >= 1024, where this product dominates the draw)."""
    dim = x.shape[-1]
    if dim <= 2 * _GRAM_BLOCK:
        g = torch.bmm(x.transpose(1, 2), x)
        return (g + g.transpose(1, 2)) / 2
    out = x.new_empty(x.shape[0], dim, dim)
    for i in range(0, dim, _GRAM_BLOCK):
        r = x[:, :, i : i + _GRAM_BLOCK].transpose(1, 2) @ x[:, :, i:]
        out[:, i : i + _GRAM_BLOCK, i:] = r
        out[:, i:, i : i + _GRAM_BLOCK] = r.transpose(1, 2)
        d = r[:, :, :_GRAM_BLOCK]  # the diagonal block: GEMM does not make it symmetric
        out[:, i : i + _GRAM_BLOCK, i : i + _GRAM_BLOCK] = (d + d.transpose(1, 2)) / 2
    return out


def lapack_threads(t: torch.Tensor):
    """Run CPU LAPACK (QR, eigh) on one thread (device.one_thread): its OpenMP panels spin
    at every step. The GEMMs, which dominate the cost, keep all threads."""
    return one_thread(t.device)


def _top_eigen(
    cov: torch.Tensor, kk: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `kk` eigenpairs (float64, eigenvalues descending) of a batch of symmetric matrices.

    Wide inputs use a randomised subspace iteration (Halko et al. 2011) seeded from the
    generator, in the covariance's precision, then a Rayleigh-Ritz step (eigh in float64): the
    returned directions diagonalise the covariance exactly within the subspace found, so PCA
    filters are exactly decorrelated on the patches even where the subspace is approximate.
    """
    groups, dim, _ = cov.shape
    width = min(dim, kk + max(16, kk // 4))
    with lapack_threads(cov):
        if dim > RANDOMIZED_MIN_DIM and 2 * width <= dim:
            q = torch.randn(groups, dim, width, generator=generator, device=generator.device)
            q = q.to(cov)
            for _ in range(RANDOMIZED_POWER_ITERS):
                q = torch.linalg.qr(torch.bmm(cov, q))[0]
            small = torch.bmm(q.transpose(1, 2), torch.bmm(cov, q)).double()
            lam, v = torch.linalg.eigh((small + small.transpose(1, 2)) / 2)
            vec = torch.bmm(q.double(), v)
        else:
            lam, vec = torch.linalg.eigh(cov.double())
    return lam.flip(-1)[:, :kk], vec.flip(-1)[:, :, :kk]

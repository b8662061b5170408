"""Weight draws for the within-layer step (DESIGN 1.1 step 1; paper section 3.1).

`draw_weight_` overwrites a unit's weight with `gaussian`, `orthogonal`, `pca` or `kmeans`
filters (or keeps it), drawn from the unit's real input so that padding, stride, dilation and
groups are exactly those of the forward pass. Only directions matter: the normalisation that
follows divides every output channel by its std and sets the bias.

Everything random comes from the caller's generator, so that the same seed, data and device
give identical bytes; everything is torch, so the draws run on the GPU as well.

Cost on a CPU is dominated by two matmuls: the patch covariance (rows x dim^2) and the
k-means similarities (points x k x dim per iteration). Both are bounded by caps below; the
top principal directions of wide inputs come from a seeded randomised subspace iteration
rather than a full eigendecomposition (a full float64 `eigh` of 4608 x 4608 takes 15-60 s on
two cores, the subspace iteration well under a second).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import UsageError
from ..options import WEIGHT_DRAWS

log = logging.getLogger(__name__)

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
# k-means: full Lloyd iterations, at most KMEANS_MAX_ITER, stopping early when at most
# KMEANS_TOL of the points changed cluster. An initialisation needs good centres, not a
# converged partition, and each iteration costs points x k x dim. On resnet50 inputs the
# mean cosine to the centre is within 0.5% of its converged value once fewer than 1% of the
# points change (after 5-12 iterations); running on to convergence takes 2-3x longer.
KMEANS_MAX_ITER = 20
KMEANS_TOL = 0.01
# k-means runs on at most this many points per centre (a random subset of the patches; the
# whitening uses all of them). Centres are means of unit vectors: 32 points already fix one
# to a few degrees, more only cost time.
KMEANS_POINTS_PER_CENTRE = 32
# Two filters whose cosine similarity exceeds this are duplicates; the later one is redrawn.
DUPLICATE_COS = 0.99
# Inputs wider than this use the randomised subspace iteration for their top directions
# (when the directions wanted are at most half of the dimensions).
RANDOMIZED_MIN_DIM = 512
RANDOMIZED_POWER_ITERS = 2
# Column block of the blocked Gram matrix.
_GRAM_BLOCK = 256
# Largest similarity block (elements) materialised at once in k-means (64 MB in float32).
_CHUNK_ELEMS = 1 << 24


@dataclass
class DrawResult:
    """What a draw did, for the report."""

    method: str  # the draw actually used: keep | gaussian | orthogonal | pca | kmeans
    requested: str
    reason: str | None  # why it fell back or filled in, else None
    samples: int = 0  # patches/rows used
    iterations: int = 0  # k-means iterations run

    def to_dict(self) -> dict:
        return asdict(self)


class _Fallback(Exception):
    """The data cannot support a data-dependent draw; the message says why."""


def draw_weight_(
    unit: nn.Module,
    x: torch.Tensor,
    method: str,
    generator: torch.Generator,
    patch_budget: int = 65536,
) -> DrawResult:
    """Overwrite `unit.weight` in place with a `method` draw from its input `x`; bias untouched.

    `unit` is a Conv1d/2d/3d (any subclass) or Linear, `x` its input as the module receives
    it. `pca` and `kmeans` use at most `patch_budget` patches (rows) per group, chosen at
    random before they are materialised. Where the data cannot support them (fewer patches
    than outputs, a degenerate or non-finite input, an unsupported unit) the draw falls back
    to `gaussian` and the result says why.
    """
    if method not in WEIGHT_DRAWS:
        raise UsageError(f"unknown weight draw {method!r}; choose one of {', '.join(WEIGHT_DRAWS)}")
    if patch_budget < 1:
        raise UsageError(f"patch budget must be positive, got {patch_budget}")
    if method == "keep":
        return DrawResult("keep", method, None)
    weight = unit.weight
    groups, out_per_group, dim = _layout(unit)
    with torch.no_grad():
        if method in ("gaussian", "orthogonal"):
            w = _gaussian(groups, out_per_group, dim, generator)
            if method == "orthogonal":
                w = _orthogonalize(w)
            _write(weight, w)
            return DrawResult(method, method, None)
        try:
            patches = _patches(unit, x, patch_budget, generator)
            result = _data_draw(unit, patches, method, out_per_group, generator)
        except _Fallback as fb:
            _write(weight, _gaussian(groups, out_per_group, dim, generator))
            log.debug("%s draw fell back to gaussian: %s", method, fb)
            return DrawResult("gaussian", method, str(fb))
        return result


# ----------------------------------------------------------------------------- layout


def _layout(unit: nn.Module) -> tuple[int, int, int]:
    """(groups, outputs per group, filter length): the weight seen as (groups, k, dim)."""
    w = unit.weight
    if isinstance(unit, _ConvNd) and not unit.transposed:
        groups = unit.groups
        return groups, w.shape[0] // groups, w[0].numel()
    return 1, w.shape[0], w[0].numel() if w.dim() > 1 else 1


def _write(weight: torch.Tensor, w: torch.Tensor) -> None:
    weight.copy_(w.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))


def _gaussian(groups: int, k: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(groups, k, dim, generator=generator, device=generator.device)


def _orthogonalize(w: torch.Tensor) -> torch.Tensor:
    """Like `nn.init.orthogonal_` per group: QR of the Gaussian (k, dim) with the sign fix."""
    k, dim = w.shape[-2:]
    a = w.double() if k >= dim else w.double().transpose(1, 2)
    with _lapack_threads(a):
        q, r = torch.linalg.qr(a)
    q = q * torch.diagonal(r, dim1=1, dim2=2).sign().unsqueeze(1)
    q = q if k >= dim else q.transpose(1, 2)
    return q.float()


# ----------------------------------------------------------------------------- patches


class _Patches(NamedTuple):
    rows: torch.Tensor  # (groups, n, dim) float32; columns in (tap, channel) order
    taps: int  # kernel taps per channel (1 for a linear unit)
    positions: torch.Tensor | None  # flat (batch, output position) index of each row; None: all
    total: int  # positions available


def _patches(
    unit: nn.Module, x: torch.Tensor, budget: int, generator: torch.Generator
) -> _Patches:
    """The rows the unit's filters see, at most `budget` of them, chosen before gathering.

    Positions are in order (batch, then output positions) when all are used. Conv rows come
    tap-major (all channels of tap 0, then tap 1, ...): that gathers contiguous channel
    vectors; `_to_weight_order` turns filters back into the weight's (channel, tap) layout.
    """
    if isinstance(unit, nn.Linear):
        if x.dim() == 0 or x.shape[-1] != unit.in_features:
            raise _Fallback(f"input of shape {tuple(x.shape)} does not match the unit")
        rows = x.reshape(-1, x.shape[-1])
        idx = _choose(rows.shape[0], budget, generator)
        rows = rows if idx is None else rows[idx.to(rows.device)]
        return _Patches(rows.float().unsqueeze(0), 1, idx, x.numel() // x.shape[-1])
    if not isinstance(unit, _ConvNd) or unit.transposed:
        raise _Fallback(f"no patch draw for {type(unit).__name__}")
    return _conv_patches(unit, x, budget, generator)


def _choose(total: int, budget: int, generator: torch.Generator) -> torch.Tensor | None:
    """A sorted random subset of `budget` of `total` positions, or None for all of them."""
    if total <= budget:
        return None
    idx = torch.randperm(total, generator=generator, device=generator.device)[:budget]
    return idx.sort().values


def _conv_patches(
    unit: _ConvNd, x: torch.Tensor, budget: int, generator: torch.Generator
) -> _Patches:
    """Gather conv patches straight from the unpadded input, one tap at a time.

    Padding is applied as a map of coordinates (zeros, reflect, replicate, circular), so
    neither a padded nor a channels-last copy of the whole input is made: on resnet50 those
    copies cost more than the gathers themselves.
    """
    nd = len(unit.kernel_size)
    if x.dim() == nd + 1:  # unbatched input, which torch convs accept
        x = x.unsqueeze(0)
    if x.dim() != nd + 2 or x.shape[1] != unit.in_channels:
        raise _Fallback(f"input of shape {tuple(x.shape)} does not match the unit")
    kernel, stride, dilation = unit.kernel_size, unit.stride, unit.dilation
    size = x.shape[2:]
    lo, hi = _padding(unit, size)
    out = [(size[i] + lo[i] + hi[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
           for i in range(nd)]
    if min(out) < 1:
        raise _Fallback(f"input smaller than the kernel ({tuple(size)})")
    total = x.shape[0] * math.prod(out)
    idx = _choose(total, budget, generator)
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
    return _Patches(rows.reshape(groups, len(image), -1), len(taps), idx, total)


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
                raise _Fallback(f"unsupported padding {padding!r}")
            total = dilation[i] * (kernel[i] - 1) if padding == "same" else 0
            lo[i], hi[i] = total // 2, total - total // 2  # torch's 'same': odd pixel at the end
        else:
            lo[i] = hi[i] = padding[i]
    if _dynamic_same(unit):  # timm's TF-style SAME, computed from the input size in forward
        if unit.padding_mode != "zeros" and any(lo + hi):
            raise _Fallback("dynamic 'same' padding combined with non-zero padding")
        for i in range(nd):
            s = size[i]
            total = max((math.ceil(s / stride[i]) - 1) * stride[i]
                        + (kernel[i] - 1) * dilation[i] + 1 - s, 0)
            lo[i] += total // 2
            hi[i] += total - total // 2
    return lo, hi


def _to_weight_order(w: torch.Tensor, taps: int) -> torch.Tensor:
    """Filters over (tap, channel) columns -> the weight's (channel, tap) layout."""
    if taps == 1:
        return w
    groups, k, dim = w.shape
    return w.reshape(groups, k, taps, dim // taps).transpose(2, 3).reshape(groups, k, dim)


def _dynamic_same(unit: nn.Module) -> bool:
    names = {c.__name__ for c in type(unit).__mro__}
    dynamic = getattr(unit, "same_pad", False) is True  # timm's StdConv2dSame and kin
    return dynamic or bool(names & {"Conv2dSame", "Conv2dSameExport"})


# ----------------------------------------------------------------------------- pca / kmeans


def _data_draw(
    unit: nn.Module, found: _Patches, method: str, k: int, generator: torch.Generator
) -> DrawResult:
    patches = found.rows
    groups, n, dim = patches.shape
    what = "rows" if isinstance(unit, nn.Linear) else "patches"
    if n < k:
        if found.total >= k:
            raise _Fallback(f"patch budget ({n}) below outputs ({k})")
        raise _Fallback(f"fewer {what} ({n}) than outputs ({k})")
    notes: list[str] = []
    basis, usable = _whiten(patches, k, generator)  # patches are centred in place
    dead = usable.sum(1) == 0
    if bool(dead.all()):
        raise _Fallback("degenerate input (no variance)")
    iterations = 0
    if method == "pca":
        w = _pca_filters(basis, usable, k, generator, notes)
    else:
        w, iterations = _kmeans_filters(patches, basis, ~dead, k, generator, notes)
    if bool(dead.any()):
        w[dead] = _gaussian(int(dead.sum()), k, dim, generator).to(w.device)
        notes.append(f"{int(dead.sum())} of {groups} groups had no input variance: gaussian")
    if not bool(torch.isfinite(w).all()):  # cannot happen with finite input; never write NaN
        raise _Fallback("non-finite filters")
    _write(unit.weight, _to_weight_order(w, found.taps))
    reason = "; ".join(notes) or None
    log.debug("%s draw: %d %s of dim %d per group, %d groups, %s", method, n, what, dim, groups,
              reason or "ok")
    return DrawResult(method, method, reason, samples=n, iterations=iterations)


def _whiten(
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
        raise _Fallback("non-finite input")  # over a large input costs more than the draw
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


@contextmanager
def _lapack_threads(t: torch.Tensor) -> Iterator[None]:
    """Run CPU LAPACK (QR, eigh) on one thread. Its OpenMP panels spin at every step: with
    the cores shared (other processes, or torch's own inter-op work), QR and eigh of a few
    hundred columns took 2-4 s on two threads against 0.01-0.1 s on one. The GEMMs, which
    dominate the cost, keep all threads."""
    threads = torch.get_num_threads()
    if t.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    with _lapack_threads(cov):
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


def _pca_filters(
    basis: torch.Tensor, usable: torch.Tensor, k: int, generator: torch.Generator,
    notes: list[str],
) -> torch.Tensor:
    """Whitened principal directions as filters; missing ones are random whitened combinations."""
    groups, dim, kk = basis.shape
    w = torch.zeros(groups, k, dim, device=basis.device)
    w[:, :kk] = basis.transpose(1, 2)
    fill = torch.ones(groups, k, dtype=torch.bool, device=basis.device)
    fill[:, :kk] = ~usable
    fill[usable.sum(1) == 0] = False  # degenerate groups are handled by the caller
    if bool(fill.any()):
        r = torch.randn(groups, k, kk, generator=generator, device=generator.device)
        combos = torch.bmm(r.to(basis.device), basis.transpose(1, 2))
        w = torch.where(fill.unsqueeze(-1), combos, w)
        rank = int(usable.sum(1).max())
        notes.append(f"{rank} principal directions for {k} outputs (input dim {dim}); "
                     f"{int(fill.sum(1).max())} filters are random whitened combinations")
    return w


def _kmeans_filters(
    patches: torch.Tensor, basis: torch.Tensor, live: torch.Tensor, k: int,
    generator: torch.Generator, notes: list[str],
) -> tuple[torch.Tensor, int]:
    """Spherical k-means on whitened, L2-normalised patches; centres mapped back to filters.

    With k' = min(k, dim) whitened dimensions, k > k' (e.g. a 1x1 conv that widens its input)
    still gives k distinct centres as long as there are k distinct points: k-means runs in all
    k' dimensions and the filters are then necessarily linearly dependent, as any k > dim
    filters are. Centres that still coincide (fewer distinct patches than outputs) are redrawn
    as gaussian filters and the reason says so. Groups in `live` False are left to the caller.
    """
    groups, n, dim = patches.shape
    n_points = min(n, KMEANS_POINTS_PER_CENTRE * k)
    idx = _choose(n, n_points, generator)
    pts = patches if idx is None else patches[:, idx.to(patches.device)]
    z = torch.bmm(pts, basis)  # whitened coordinates (G, n_points, k')
    del pts
    norms = z.norm(dim=-1, keepdim=True)
    valid = norms.squeeze(-1) > 1e-6
    z = torch.where(valid.unsqueeze(-1), z / norms.clamp_min(1e-12), 0.0)
    short = (valid.sum(1) < k) & live
    if bool((short | ~live).all()):
        raise _Fallback(f"fewer non-constant patches ({int(valid.sum(1).max())}) than "
                        f"outputs ({k})")
    centres, iterations = _spherical_kmeans(z, valid, k, generator)
    w = torch.bmm(centres, basis.transpose(1, 2))  # W_i = c_i @ (U / sqrt(lambda + eps)).T
    w = _redraw_duplicates(w, live & ~short, generator, notes)
    if bool(short.any()):
        w[short] = _gaussian(int(short.sum()), k, dim, generator).to(w.device)
        notes.append(f"{int(short.sum())} of {groups} groups had fewer non-constant patches "
                     f"than outputs ({k}): gaussian")
    return w, iterations


def _spherical_kmeans(
    z: torch.Tensor, valid: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Batched (per group) spherical k-means on unit vectors; invalid rows are zero vectors.

    Random distinct initial points; an empty cluster is re-seeded with the point farthest from
    its centre (distinct points for distinct clusters).
    """
    groups, n, d = z.shape
    score = torch.rand(groups, n, generator=generator, device=generator.device).to(z.device)
    init = score.masked_fill(~valid, -1.0).topk(k, dim=1).indices
    centres = torch.gather(z, 1, init.unsqueeze(-1).expand(-1, -1, d)).clone()
    total_valid = int(valid.sum())
    prev: torch.Tensor | None = None
    reseeded = False
    iterations = 0
    for iterations in range(1, KMEANS_MAX_ITER + 1):  # noqa: B007 (reported)
        best, assign = _assign(z, centres)
        if prev is not None and not reseeded:
            changed = int(((assign != prev) & valid).sum())
            if changed <= KMEANS_TOL * total_valid:
                break
        sums, counts = _accumulate(z, assign, valid, k)
        size = sums.norm(dim=-1, keepdim=True)
        centres = sums / size.clamp_min(1e-12)
        empty = (counts == 0) | (size.squeeze(-1) <= 1e-12)
        reseeded = bool(empty.any())
        if reseeded:
            centres = _reseed(z, valid, best, centres, empty)
        prev = assign
    return centres, iterations


def _assign(z: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine similarity and nearest centre of every point, in memory-bounded chunks."""
    groups, n, _ = z.shape
    chunk = max(1, _CHUNK_ELEMS // (groups * centres.shape[1]))
    ct = centres.transpose(1, 2)
    best, assign = [], []
    for s in range(0, n, chunk):
        b, a = torch.bmm(z[:, s : s + chunk], ct).max(-1)
        best.append(b)
        assign.append(a)
    return torch.cat(best, 1), torch.cat(assign, 1)


def _accumulate(
    z: torch.Tensor, assign: torch.Tensor, valid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts. On the CPU a sort then segment sums (index_add_ and
    scatter_add_ are 3-6x slower there); elsewhere a one-hot matmul, because atomic float adds
    on the GPU would make the sums order-dependent (non-deterministic)."""
    groups, n, d = z.shape
    if z.device.type == "cpu" and hasattr(torch, "segment_reduce"):
        flat = (assign + torch.arange(groups).unsqueeze(1) * k).reshape(-1)
        size = torch.bincount(flat, minlength=groups * k)
        counts = torch.bincount(flat, weights=valid.reshape(-1).to(z.dtype), minlength=groups * k)
        order = torch.argsort(flat, stable=True)
        sums = torch.segment_reduce(z.reshape(-1, d)[order], "sum", lengths=size, axis=0)
        return sums.reshape(groups, k, d), counts.reshape(groups, k)
    sums = torch.zeros(groups, k, d, device=z.device)
    counts = torch.zeros(groups, k, device=z.device)
    chunk = max(1, _CHUNK_ELEMS // (groups * k))
    for s in range(0, n, chunk):
        onehot = F.one_hot(assign[:, s : s + chunk], k).to(z.dtype)
        onehot = onehot * valid[:, s : s + chunk].unsqueeze(-1)
        sums += torch.bmm(onehot.transpose(1, 2), z[:, s : s + chunk])
        counts += onehot.sum(1)
    return sums, counts


def _reseed(
    z: torch.Tensor, valid: torch.Tensor, best: torch.Tensor, centres: torch.Tensor,
    empty: torch.Tensor,
) -> torch.Tensor:
    """Move each empty cluster to a different one of the points farthest from their centres."""
    d = z.shape[-1]
    m = int(empty.sum(1).max())
    far = best.masked_fill(~valid, float("inf")).topk(m, dim=1, largest=False).indices
    rank = (empty.cumsum(1) - 1).clamp(0, m - 1)
    src = torch.gather(far, 1, rank)
    new = torch.gather(z, 1, src.unsqueeze(-1).expand(-1, -1, d))
    return torch.where(empty.unsqueeze(-1), new, centres)


def _redraw_duplicates(
    w: torch.Tensor, live: torch.Tensor, generator: torch.Generator, notes: list[str]
) -> torch.Tensor:
    """Replace the later filter of any pair with cosine similarity > DUPLICATE_COS, and any
    zero filter, by a gaussian one (groups in `live`)."""
    groups, k, dim = w.shape
    unit = F.normalize(w, dim=-1)
    cos = torch.bmm(unit, unit.transpose(1, 2)).triu(1)
    dup = ((cos > DUPLICATE_COS).any(1) | (w.abs().sum(-1) == 0)) & live.unsqueeze(1)
    if not bool(dup.any()):
        return w
    fresh = torch.randn(groups, k, dim, generator=generator, device=generator.device)
    w = torch.where(dup.unsqueeze(-1), fresh.to(w.device), w)
    notes.append(f"{int(dup.sum())} of {groups * k} k-means centres coincided (too few distinct "
                 f"whitened patches) and were redrawn as gaussian filters")
    return w

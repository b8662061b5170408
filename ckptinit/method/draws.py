"""Weight draws for the within-layer step (DESIGN 1.1 step 1; paper section 3.1).

`draw_weight_` overwrites a unit's weight with `gaussian`, `orthogonal`, `pca` or `kmeans`
filters (or keeps it), drawn from the unit's real input so that padding, stride, dilation and
groups are exactly those of the forward pass. Only directions matter: the normalisation that
follows divides every output channel by its std and sets the bias.

Everything random comes from the caller's generator, so that the same seed, data and device
give identical bytes; everything is torch, so the draws run on the GPU as well.

Cost on a CPU is dominated by two matmuls: the patch covariance (rows x dim^2, in
patches.py, which also gathers the patches and whitens them) and the k-means similarities
(points x k x dim per iteration). Both are bounded by caps (the patch budget, and
KMEANS_POINTS_PER_CENTRE below).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import UsageError
from ..options import WEIGHT_DRAWS
from .patches import (
    Fallback,
    Patches,
    choose,
    extract_patches,
    lapack_threads,
    to_weight_order,
    whiten,
)

log = logging.getLogger(__name__)

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
            patches = extract_patches(unit, x, patch_budget, generator)
            result = _data_draw(unit, patches, method, out_per_group, generator)
        except Fallback as fb:
            _write(weight, _gaussian(groups, out_per_group, dim, generator))
            log.debug("%s draw fell back to gaussian: %s", method, fb)
            return DrawResult("gaussian", method, str(fb))
        return result


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
    with lapack_threads(a):
        q, r = torch.linalg.qr(a)
    q = q * torch.diagonal(r, dim1=1, dim2=2).sign().unsqueeze(1)
    q = q if k >= dim else q.transpose(1, 2)
    return q.float()


def _data_draw(
    unit: nn.Module, found: Patches, method: str, k: int, generator: torch.Generator
) -> DrawResult:
    patches = found.rows
    groups, n, dim = patches.shape
    what = "rows" if isinstance(unit, nn.Linear) else "patches"
    if n < k:
        if found.total >= k:
            raise Fallback(f"patch budget ({n}) below outputs ({k})")
        raise Fallback(f"fewer {what} ({n}) than outputs ({k})")
    notes: list[str] = []
    basis, usable = whiten(patches, k, generator)  # patches are centred in place
    dead = usable.sum(1) == 0
    if bool(dead.all()):
        raise Fallback("degenerate input (no variance)")
    iterations = 0
    if method == "pca":
        w = _pca_filters(basis, usable, k, generator, notes)
    else:
        w, iterations = _kmeans_filters(patches, basis, ~dead, k, generator, notes)
    if bool(dead.any()):
        w[dead] = _gaussian(int(dead.sum()), k, dim, generator).to(w.device)
        notes.append(f"{int(dead.sum())} of {groups} groups had no input variance: gaussian")
    if not bool(torch.isfinite(w).all()):  # cannot happen with finite input; never write NaN
        raise Fallback("non-finite filters")
    _write(unit.weight, to_weight_order(w, found.taps))
    reason = "; ".join(notes) or None
    log.debug("%s draw: %d %s of dim %d per group, %d groups, %s", method, n, what, dim, groups,
              reason or "ok")
    return DrawResult(method, method, reason, samples=n, iterations=iterations)


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
    idx = choose(n, n_points, generator)
    pts = patches if idx is None else patches[:, idx.to(patches.device)]
    z = torch.bmm(pts, basis)  # whitened coordinates (G, n_points, k')
    del pts
    norms = z.norm(dim=-1, keepdim=True)
    valid = norms.squeeze(-1) > 1e-6
    z = torch.where(valid.unsqueeze(-1), z / norms.clamp_min(1e-12), 0.0)
    short = (valid.sum(1) < k) & live
    if bool((short | ~live).all()):
        raise Fallback(f"fewer non-constant patches ({int(valid.sum(1).max())}) than "
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

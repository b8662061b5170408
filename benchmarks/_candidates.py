"""Candidate fixes for the within-layer step, emulated *outside* ckptinit (issue 10).

Every candidate draws or post-processes weights here and then calls ckptinit's public
`rescale` (`weights="keep"`) for the normalisation and/or the between-layer step, so the
library itself is unchanged. Names (usable as inits in `_digits.apply_init`):

  c_gauss_keep    control: our own N(0, 1) draw, then ckptinit within (keep) + between.
                  Should behave like ckptinit's default (same method, other random numbers).
  c_proj_within   N(0, 1) draw, each filter projected off its unit's mean input patch
                  (measured with a forward hook, earlier units already final), then
                  ckptinit's within-layer normalisation; unit by unit in forward order.
  c_proj          c_proj_within, then ckptinit's between-layer step.
  c_zerosum       N(0, 1) draw with each filter's own mean removed (sum of the filter = 0,
                  data-free: exact projection off the mean patch when that patch is
                  constant), then ckptinit within (keep) + between.
  c_m2_within     N(0, 1) draw, normalised by the *second moment* instead of the std:
                  W <- W / sqrt(E[(Wx)^2]), b <- beta - E[Wx] / sqrt(E[(Wx)^2]) (mean beta,
                  std below 1), unit by unit here (ckptinit would renormalise to std 1).
  c_m2            c_m2_within, then ckptinit's between-layer step (within=False).

Decomposition of the within-layer step on Kaiming weights (which train without it):
  c_k_centre      Kaiming W, b set so that every unit's mean is beta * its std (centring,
                  no rescaling).
  c_k_scale       Kaiming W divided by each unit's std (std 1), biases 0 (no centring).
  c_k_head        Kaiming, then the within-layer step on the classifier only.
The classifier's output scale (a fix suggested by the above):
  c_head_within   ckptinit within (gaussian), then the classifier's W and b times
                  HEAD_GAIN (logit std 1 -> 0.25, about what Kaiming gives here).
  c_head          c_head_within, then ckptinit's between-layer step (which keeps the
                  function, hence the logit scale).
  c_kmeans_head   as c_head with ckptinit's kmeans draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CANDIDATES = ["c_gauss_keep", "c_proj_within", "c_proj", "c_zerosum", "c_m2_within", "c_m2",
              "c_k_centre", "c_k_scale", "c_k_head", "c_head_within", "c_head",
              "c_kmeans_head"]
HEAD_GAIN = 0.25
LABELS = {
    "c_gauss_keep": "control: own gaussian + ckptinit within(keep)+between",
    "c_proj_within": "gaussian ⊥ mean patch + within",
    "c_proj": "gaussian ⊥ mean patch + within + between",
    "c_zerosum": "zero-sum gaussian + within + between",
    "c_m2_within": "gaussian, 2nd-moment norm",
    "c_m2": "gaussian, 2nd-moment norm + between",
    "c_k_centre": "Kaiming + centring only (b)",
    "c_k_scale": "Kaiming + per-unit std 1 only (W)",
    "c_k_head": "Kaiming + within on the classifier only",
    "c_head_within": "ckptinit within, classifier x0.25",
    "c_head": "ckptinit within, classifier x0.25, between",
    "c_kmeans_head": "ckptinit kmeans within, classifier x0.25, between",
}


def _units(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D) rows of the unit's input, one per output position (conv: F.unfold)."""
    if isinstance(module, nn.Conv2d):
        p = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                     stride=module.stride)  # (B, C*k*k, L)
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def _unit_input(model: nn.Module, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    got = {}

    def hook(m, inp, out):
        got["x"] = inp[0].detach().clone()

    h = module.register_forward_hook(hook)
    try:
        model(images)
    finally:
        h.remove()
    return got["x"]


@torch.no_grad()
def gaussian_(model: nn.Module, seed: int, zerosum: bool = False) -> None:
    g = torch.Generator().manual_seed(50_000 + seed)
    for _, m in _units(model):
        w = torch.randn(m.weight.shape, generator=g)
        if zerosum:
            w -= w.flatten(1).mean(1).view(-1, *[1] * (w.dim() - 1))
        m.weight.copy_(w)
        if m.bias is not None:
            m.bias.zero_()


def _rescale(model, calib, holdout, seed, **kw):
    import _digits as D

    from ckptinit.api import rescale

    opts, why = D.rescale_options(seed=seed, **kw)
    _, report = rescale(model, calib, opts, holdout=holdout)
    return report


@torch.no_grad()
def project_sequential_(model: nn.Module, calib, holdout, seed: int) -> list[dict]:
    """Unit by unit in forward order: project W off the mean input patch, then let ckptinit
    normalise (weights='keep'; units already final are left as they are by it: the step is
    idempotent, checked in step0.py)."""
    info = []
    model.eval()
    for name, m in _units(model):
        x = _unit_input(model, m, calib)
        xbar = _patches(m, x).mean(0)
        wf = m.weight.flatten(1)
        before = (wf @ xbar).abs().mean() / wf.norm(dim=1).mean()
        coef = (wf @ xbar) / (xbar @ xbar).clamp_min(1e-12)
        wf -= coef[:, None] * xbar[None]
        m.weight.copy_(wf.view_as(m.weight))
        info.append({"unit": name, "mean_patch_norm": float(xbar.norm()),
                     "response_to_mean_patch_before": float(before)})
        with torch.enable_grad():
            _rescale(model, calib, holdout, seed, weights="keep", within=True, between=False)
    return info


@torch.no_grad()
def normalise_sequential_(model: nn.Module, calib, beta: float = 0.1, *, mode: str = "m2",
                          which=lambda name: True) -> list[dict]:
    """Unit by unit in forward order (earlier units final), for the units `which` accepts:
    mode 'm2':     W <- W / rms(Wx),  b <- beta - mean(Wx) / rms(Wx)
    mode 'std':    W <- W / std(Wx),  b <- beta - mean(Wx) / std(Wx)  (ckptinit's step)
    mode 'centre': W kept,            b <- beta * std(Wx) - mean(Wx)
    mode 'scale':  W <- W / std(Wx),  b <- 0"""
    info = []
    model.eval()
    for name, m in _units(model):
        if not which(name):
            continue
        x = _unit_input(model, m, calib)
        if isinstance(m, nn.Conv2d):
            z = F.conv2d(x, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
            z = z.transpose(0, 1).reshape(z.shape[1], -1)
        else:
            z = (x @ m.weight.t()).t()
        mu = z.double().mean(1)
        sd = z.double().std(1, unbiased=False).clamp_min(1e-8)
        rms = z.double().pow(2).mean(1).sqrt().clamp_min(1e-8)
        div = {"m2": rms, "std": sd, "centre": torch.ones_like(sd), "scale": sd}[mode]
        bias = {"m2": beta - mu / rms, "std": beta - mu / sd, "centre": beta * sd - mu,
                "scale": torch.zeros_like(mu)}[mode]
        m.weight.div_(div.float().view(-1, *[1] * (m.weight.dim() - 1)))
        m.bias.copy_(bias.float())
        info.append({"unit": name, "std_after": float((sd / div).mean()),
                     "mean_over_std_before": float((mu.abs() / sd).median())})
    return info


@torch.no_grad()
def _scale_head_(model: nn.Module, gain: float) -> None:
    last = _units(model)[-1][1]
    last.weight.mul_(gain)
    if last.bias is not None:
        last.bias.mul_(gain)


def _kaiming_(model: nn.Module) -> None:
    for _, m in _units(model):
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(m.bias)


def apply_candidate(model: nn.Module, name: str, calib, holdout, seed: int) -> dict:
    out: dict = {}
    if name == "c_gauss_keep":
        gaussian_(model, seed)
        out["report"] = _rescale(model, calib, holdout, seed, weights="keep", within=True)
    elif name in ("c_proj", "c_proj_within"):
        gaussian_(model, seed)
        out["steps"] = project_sequential_(model, calib, holdout, seed)
        if name == "c_proj":
            out["report"] = _rescale(model, calib, holdout, seed, within=False)
    elif name == "c_zerosum":
        gaussian_(model, seed, zerosum=True)
        out["report"] = _rescale(model, calib, holdout, seed, weights="keep", within=True)
    elif name in ("c_m2", "c_m2_within"):
        gaussian_(model, seed)
        out["steps"] = normalise_sequential_(model, calib, mode="m2")
        if name == "c_m2":
            out["report"] = _rescale(model, calib, holdout, seed, within=False)
    elif name in ("c_k_centre", "c_k_scale", "c_k_head"):
        torch.manual_seed(seed + 1)  # the same Kaiming draw as the 'kaiming' init
        _kaiming_(model)
        if name == "c_k_head":
            head = _units(model)[-1][0]
            out["steps"] = normalise_sequential_(model, calib, mode="std",
                                                 which=lambda n: n == head)
        else:
            out["steps"] = normalise_sequential_(model, calib, mode=name[4:])
    elif name in ("c_head_within", "c_head", "c_kmeans_head"):
        out["report"] = _rescale(model, calib, holdout, seed, between=False,
                                 **({"weights": "kmeans"} if name == "c_kmeans_head" else {}))
        _scale_head_(model, HEAD_GAIN)
        if name != "c_head_within":
            out["report"] = _rescale(model, calib, holdout, seed, within=False)
    else:
        raise ValueError(name)
    model.train()
    return out

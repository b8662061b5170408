"""Shared by the method tests: small nets, trained-looking weights, and measurements made
with code of their own (no ckptinit import), so that a test checks the step from outside."""

from __future__ import annotations

import math

import torch
from torch import nn

LOADED = dict(within=False, weights="keep")


def pretend_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but non-degenerate norm parameters and running statistics, and unit weights
    scaled apart, as a checkpoint has (timm's zero-init of the last BN gamma would leave
    whole blocks without gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale / ConvNeXt gamma
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
            if name in ("cls_token", "pos_embed", "reg_token"):  # timm starts them near 0
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for m in units(model).values():
            m.weight.mul_(float(torch.empty(()).uniform_(-1, 1, generator=g).exp()))
    return model.eval()


def units(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and getattr(m, "weight", None) is not None and m.weight.dim() >= 2}


def fused_qkv(model: nn.Module) -> set[str]:
    return {f"{n}.qkv" for n, m in model.named_modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")}


def fused_glu(model: nn.Module) -> dict[str, tuple[str, str]]:
    """timm's GluMlp: one fc1 whose output is chunked into gate and value halves (the order
    its `gate_last` says)."""
    from timm.layers import GluMlp

    return {f"{n}.fc1": ("value", "gate") if m.gate_last else ("gate", "value")
            for n, m in model.named_modules() if isinstance(m, GluMlp)}


def rates(model: nn.Module, x: torch.Tensor, draws: int = 8, seed: int = 1234,
          batch: int | None = None) -> dict[str, float]:
    """||dL/dW|| / ||W|| per unit, per q/k/v slice of fused projections ('name[q]') and per
    half of a fused GLU's fc1 ('name[gate]', 'name[value]'), with Gaussian g over
    every output tensor, BatchNorm on batch statistics (restored after)."""
    us, qkv, glu = units(model), fused_qkv(model), fused_glu(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    gen = torch.Generator().manual_seed(seed)
    sq = {n: torch.zeros(3 if n in qkv else 2 if n in glu else 1, dtype=torch.float64)
          for n in us}
    for _ in range(draws):
        xb = x if batch is None else x[torch.randperm(len(x), generator=gen)[:batch]]
        y = model(xb)
        ys = [y] if isinstance(y, torch.Tensor) else list(y)
        loss = sum((torch.randn(t.shape, generator=gen) * t).sum() for t in ys)
        grads = torch.autograd.grad(loss, [m.weight for m in us.values()], allow_unused=True)
        for n, gr in zip(us, grads):
            if gr is not None:
                sq[n] += (gr.double().reshape(sq[n].numel(), -1) ** 2).sum(1)
    model.load_state_dict(state)
    model.eval()
    out = {}
    for n, m in us.items():
        w2 = (m.weight.detach().double().reshape(sq[n].numel(), -1) ** 2).sum(1)
        vals = (sq[n] / draws / w2).sqrt().tolist()
        if len(vals) > 1:
            out.update({f"{n}[{s}]": v for s, v in zip(glu.get(n, "qkv"[-len(vals):]), vals)})
        else:
            out[n] = vals[0]
    return out


def movable(report) -> list[str]:
    """Unit (slice) names the report says the between-layer step may move."""
    keys = []
    for u in report.units:
        if u.slices:
            keys += [f"{u.name}[{s['slice']}]" for s in u.slices
                     if s["status"] in ("ok", "not converged", "tied", "limited")]
        elif u.between_status in ("ok", "not converged", "tied", "limited"):
            keys.append(u.name)
    return keys


def spread(r: dict[str, float], keys) -> float:
    vals = [r[k] for k in keys if r.get(k, 0) > 0]
    return max(vals) / min(vals)


def log_deviation(r: dict[str, float], keys) -> dict[str, float]:
    """|log rate - log geometric mean| per key."""
    ks = [k for k in keys if r.get(k, 0) > 0]
    mean = sum(math.log(r[k]) for k in ks) / len(ks)
    return {k: abs(math.log(r[k]) - mean) for k in ks}


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    y = model(x)
    ys = [y] if isinstance(y, torch.Tensor) else list(y)
    return torch.cat([t.double().flatten(1) for t in ys], 1)


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@torch.no_grad()
def unit_stats(model: nn.Module, x: torch.Tensor, batch: int, train_bn: bool = True) -> dict:
    """Per unit: (channel-averaged |mean - 0.1|, channel-averaged |std - 1|, has bias) of its
    first-call output over all of x, run in batches of `batch` (BatchNorm on batch
    statistics, restored after, as the within-layer step sees it; or eval mode)."""
    us = units(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    acc: dict[str, list] = {}
    seen: set[str] = set()

    def hook_for(name, linear):
        def hook(module, args, z):
            if name in seen:
                return
            seen.add(name)
            zz = z.double()
            dims = tuple(i for i in range(zz.dim()) if i != (zz.dim() - 1 if linear else 1))
            n = zz.numel() // zz.shape[-1 if linear else 1]
            s, q = zz.sum(dims), (zz * zz).sum(dims)
            a = acc.setdefault(name, [0, 0.0, 0.0])
            a[0] += n
            a[1] = a[1] + s
            a[2] = a[2] + q
        return hook

    hooks = [m.register_forward_hook(hook_for(n, isinstance(m, nn.Linear))) for n, m in us.items()]
    model.eval()
    if train_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    try:
        for i in range(0, len(x), batch):
            seen.clear()
            model(x[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(state)
        model.eval()
    out = {}
    for name, (n, s, q) in acc.items():
        mean = s / n
        std = (q / n - mean * mean).clamp_min(0).sqrt()
        live = std > 1e-6
        out[name] = (float((mean[live] - 0.1).abs().mean()), float((std[live] - 1).abs().mean()),
                     us[name].bias is not None)
    return out


class PlainNet(nn.Module):
    """conv-relu-pool chain into linears: the paper's setting (no BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.f1 = nn.Linear(16, 32)
        self.f2 = nn.Linear(32, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        x = torch.relu(self.c3(x)).mean((2, 3))
        return self.f2(torch.relu(self.f1(x)))

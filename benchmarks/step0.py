"""Issue 10: a first look at why ckptinit's default (gaussian + within + between) breaks the
no-BN VGG under SGD, and whether candidate fixes (emulated in `_candidates.py`, outside
ckptinit) remove it.

    python benchmarks/step0.py            # vgg11 + vgg19 diagnostics, candidates trained
    python benchmarks/step0.py --quick
    python benchmarks/step0.py --table benchmarks/results/step0.json

Per init, at step 0 with the real cross-entropy loss on 256 training digits, per unit:
* rate      ||dL/dW|| / ||W|| (cross-entropy, labels), and the bias RMS
* |M|/s     per channel, |mean of W x| / std of W x (no bias): the output's response to the
            mean input patch over its spread, i.e. what the within-layer step cancels with
            the bias (after within, b = beta - M/s). Measured on the final model; it is
            scale-invariant, so it equals the value before the within-layer normalisation
            (and is unchanged by the between-layer step). Median and max over channels.
* amp       (rms of dW*x / mean channel std of z) / (||dW|| / ||W||) for the gradient
            direction dW: how far the unit's output moves, in units of its own std, per
            relative change of W. ~1 when inputs are centred; ~|M|/s in the cancellation
            regime. `shift` is the share of that move that is a uniform shift dW*mean_patch.
* the first 10 SGD steps' loss at lr 0.01 (momentum 0.9, batch 32, seeds 0-2).
Then the candidates are trained on convergence.py's grid (same budget, seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _candidates as C  # noqa: E402
import _digits as D  # noqa: E402
import convergence  # noqa: E402

DIAG_INITS = D.CNN_INITS + C.CANDIDATES
DEFAULT = {
    "diag_nets": ["vgg11", "vgg19"], "diag_seeds": [0, 1, 2], "steps": 10, "lr": 0.01,
    "train": {"vgg11": ["c_gauss_keep", "c_proj", "c_m2", "c_k_centre", "c_k_scale",
                        "c_k_head", "c_head", "c_kmeans_head"],
              "vgg19": ["c_proj", "c_head", "c_kmeans_head"]},
    "seeds": [0, 1, 2],
}
QUICK = {
    "diag_nets": ["vgg11"], "diag_seeds": [0], "steps": 10, "lr": 0.01,
    "train": {"vgg11": ["c_proj", "c_head"]}, "seeds": [0],
}


@torch.no_grad()
def _per_channel(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, C, ...) or (B, C) -> per-channel mean, std over batch and positions."""
    zc = z.transpose(0, 1).reshape(z.shape[1], -1).double()
    return zc.mean(1), zc.std(1, unbiased=False)


def _apply(m, x, w):
    if isinstance(m, torch.nn.Conv2d):
        return F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)
    return x @ w.t()


def diagnose(task: dict) -> dict:
    D.setup_determinism()
    data = D.load_digits32()
    net, init, seed = task["net"], task["init"], task["seed"]
    torch.manual_seed(seed)
    model = D.make_net(net)
    info = D.apply_init(model, init, data, seed)
    row = {"net": net, "init": init, "seed": seed, "init_ok": info["ok"],
           "init_error": info.get("error"), "init_seconds": info["seconds"]}
    if not info["ok"]:
        return row
    g = torch.Generator().manual_seed(30_000 + seed)
    idx = torch.randperm(len(data.train_x), generator=g)[:256]
    xb, yb = data.train_x[idx], data.train_y[idx]
    inputs = {}
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].detach()))
        for n, m in D.affine_units(model)]
    model.train()
    model.zero_grad()
    out = model(xb)
    loss = F.cross_entropy(out, yb)
    loss.backward()
    for h in hooks:
        h.remove()
    units = []
    with torch.no_grad():
        for n, m in D.affine_units(model):
            x, w, gw = inputs[n], m.weight, m.weight.grad
            zw = _apply(m, x, w)
            mu, sd = _per_channel(zw)
            ratio = mu.abs() / sd.clamp_min(1e-12)
            z_mu, z_sd = _per_channel(zw + (m.bias.view(1, -1, *[1] * (zw.dim() - 2))
                                            if m.bias is not None else 0))
            eps = float(gw.norm() / w.norm())
            dz = _apply(m, x, gw)
            xbar = C._patches(m, x).mean(0)
            shift = gw.flatten(1) @ xbar  # the uniform part of dz, per channel
            dz_rms = float(dz.double().pow(2).mean().sqrt())
            amp = dz_rms / (eps * float(z_sd.mean())) if eps > 0 else float("nan")
            units.append({
                "unit": n, "rate_ce": eps,
                "bias_rms": float(m.bias.norm() / math.sqrt(m.bias.numel())),
                "bias_absmax": float(m.bias.abs().max()),
                "grad_bias_over_bias": float(m.bias.grad.norm() / m.bias.norm().clamp_min(
                    1e-12)),
                "M_over_s_median": float(ratio.median()), "M_over_s_max": float(ratio.max()),
                "out_mean": float(z_mu.mean()), "out_std": float(z_sd.mean()),
                "amp": amp, "shift_share": float(shift.double().pow(2).mean().sqrt()) / dz_rms
                if dz_rms > 0 else float("nan")})
    row["loss0"] = loss.item()
    row["units"] = units
    rates = [u["rate_ce"] for u in units if u["rate_ce"] > 0]
    row["rate_ce_spread"] = max(rates) / min(rates) if rates else None
    state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    r = D.train(model, data.train_x, data.train_y, data.test_x, data.test_y, optimizer="sgd",
                lr=task["lr"], epochs=1, batch_size=32, seed=seed, max_steps=task["steps"])
    row["first_losses"] = r["losses"]
    D.log(f"{net} {init} seed {seed}: loss0 {row['loss0']:.3f}, after {task['steps']} steps "
          f"at lr {task['lr']}: {r['losses'][-1]:.3g}")
    return row


@torch.no_grad()
def idempotence() -> dict:
    """ckptinit's within-layer step run twice (weights='keep' the second time) changes
    nothing: what project_sequential_ relies on."""
    from ckptinit.api import rescale

    D.setup_determinism()
    data = D.load_digits32()
    calib, _, _ = data.calibration(0)
    torch.manual_seed(0)
    m = D.make_net("vgg11")
    with torch.enable_grad():
        rescale(m, calib, D.rescale_options(between=False)[0])
        s1 = copy.deepcopy(m.state_dict())
        rescale(m, calib, D.rescale_options(weights="keep", within=True, between=False)[0])
    rel = max(float((v - s1[k]).abs().max() / s1[k].abs().max().clamp_min(1e-12))
              for k, v in m.state_dict().items())
    return {"max_relative_change": rel}


# --------------------------------------------------------------------------- tables


METRICS = ["rate_ce", "M_over_s_median", "M_over_s_max", "bias_rms", "amp", "shift_share",
           "out_std"]


def markdown(result: dict, metrics=None, layer_nets=None) -> str:
    """All tables; `metrics`/`layer_nets` restrict the per-layer ones (README keeps a few)."""
    metrics = METRICS if metrics is None else metrics
    lines = []
    rows = [r for r in result["diag"] if r.get("init_ok")]
    for net in result["config"]["diag_nets"]:
        rs = {r["init"]: r for r in rows if r["net"] == net and r["seed"] == 0}
        if not rs:
            continue
        names = [u["unit"].replace("features.", "") for u in next(iter(rs.values()))["units"]]
        for key, title, fmt in [
            ("rate_ce", "||dL/dW|| / ||W|| (cross-entropy)", "{:.2g}"),
            ("M_over_s_median", "|M|/s, median over channels", "{:.2g}"),
            ("M_over_s_max", "|M|/s, max over channels", "{:.2g}"),
            ("bias_rms", "bias RMS", "{:.2g}"),
            ("amp", "amp: output move (in stds) per relative weight move", "{:.2g}"),
            ("shift_share", "share of that move that is a uniform shift dW*mean_patch",
             "{:.2f}"),
            ("out_std", "output std (mean over channels)", "{:.2g}"),
        ]:
            if key not in metrics or (layer_nets is not None and net not in layer_nets):
                continue
            lines.append(f"**{net}, seed 0: {title}**\n")
            lines.append("| init | " + " | ".join(names) + " |")
            lines.append("|---|" + "---|" * len(names))
            for init in result["config"]["diag_inits"]:
                r = rs.get(init)
                if r is None:
                    continue
                lines.append(f"| {D.INIT_LABELS.get(init, init)} | "
                             + " | ".join(fmt.format(float(u[key])) for u in r["units"])
                             + " |")
            lines.append("")
        # first steps' loss, all seeds
        lines.append(f"**{net}: cross-entropy over the first {result['config']['steps']} SGD "
                     f"steps at lr {result['config']['lr']:g} (seeds "
                     f"{', '.join(map(str, result['config']['diag_seeds']))})**\n")
        lines.append("| init | CE-rate spread | loss at steps 0, 1, 2, 3, 5, 10 |")
        lines.append("|---|---|---|")
        for init in result["config"]["diag_inits"]:
            seeds = [r for r in rows if r["net"] == net and r["init"] == init]
            if not seeds:
                continue
            parts = []
            for r in seeds:
                ls = r["first_losses"]
                parts.append(", ".join(f"{float(ls[i]):.3g}" if i < len(ls) else "—"
                                       for i in (0, 1, 2, 3, 5, 10)))
            sp = seeds[0].get("rate_ce_spread")
            lines.append(f"| {D.INIT_LABELS.get(init, init)} | {sp:.3g}x | "
                         + " / ".join(parts) + " |")
        lines.append("")
    if result.get("train"):
        lines.append("**Candidates trained on convergence.py's grid and budget** (rows from "
                     "the convergence run, when its JSON is given, for comparison)\n")
        lines.append(convergence.markdown(result["train"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--results-dir", help="default benchmarks/results/default or .../quick")
    ap.add_argument("--convergence", help="convergence JSON to merge reference rows from "
                                          "(default: convergence.json in the results dir, "
                                          "if present)")
    ap.add_argument("--table", metavar="JSON")
    ap.add_argument("--replot", metavar="JSON", help="redraw the PNG beside a result file")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    if args.replot:
        out = Path(args.replot)
        convergence.plot(json.loads(out.read_text())["train"],
                         out.with_name(out.stem + "_train.png"))
        return
    cfg = copy.deepcopy(QUICK if args.quick else DEFAULT)
    cfg["diag_inits"] = DIAG_INITS
    out = D.results_dir(args.results_dir, args.quick) / "step0.json"
    t0 = time.time()
    result = {"provenance": D.provenance(), "config": cfg}
    result["idempotence"] = idempotence()
    D.log(f"ckptinit within twice: max relative weight change {result['idempotence']}")
    diag_tasks = [{"net": n, "init": i, "seed": s, "lr": cfg["lr"], "steps": cfg["steps"]}
                  for n in cfg["diag_nets"] for i in DIAG_INITS for s in cfg["diag_seeds"]]
    conv_cfg = copy.deepcopy(convergence.QUICK if args.quick else convergence.DEFAULT)
    conv_cfg["seeds"] = cfg["seeds"]
    conv_cfg["nets"] = {n: dict(conv_cfg["nets"][n], inits=inits)
                        for n, inits in cfg["train"].items()}
    train_tasks = convergence.build_tasks(conv_cfg)
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=16) as pool:
        diag = pool.map_async(diagnose, diag_tasks)
        cells = list(pool.imap_unordered(D.run_cell, train_tasks))
        result["diag"] = sorted(diag.get(), key=lambda r: (r["net"], r["init"], r["seed"]))
    cells.sort(key=lambda c: (c["net"], c["init"], c["seed"]))
    conv_path = Path(args.convergence) if args.convergence else out.parent / "convergence.json"
    ref_cells = []
    if conv_path.exists():
        ref = json.loads(conv_path.read_text())
        if ref["config"]["seeds"] == cfg["seeds"]:
            for net, inits in cfg["train"].items():
                if ref["config"]["nets"].get(net, {}).get("lrs") == conv_cfg["nets"][net]["lrs"] \
                        and ref["config"]["nets"][net]["epochs"] == \
                        conv_cfg["nets"][net]["epochs"]:
                    keep = ["kaiming", "lsuv", "ckpt_default", "ckpt_kmeans"]
                    ref_cells += [c for c in ref["cells"] if c["net"] == net
                                  and c["init"] in keep]
                    conv_cfg["nets"][net]["inits"] = keep + inits
        result["reference"] = str(conv_path)
    all_cells = ref_cells + cells
    result["train"] = {"config": conv_cfg, "cells": all_cells,
                       "summary": convergence.summarise(all_cells)}
    result["wall_seconds"] = time.time() - t0
    D.write_json(result, out)
    convergence.plot(result["train"], out.with_name(out.stem + "_train.png"))
    D.log(f"done in {result['wall_seconds']:.0f} s: {out}")
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Issue 10's convergence benchmark: digits at 32 px, fixed budget, an lr grid per init.

    python benchmarks/convergence.py                 # default settings (see BUDGET below)
    python benchmarks/convergence.py --quick         # smoke run, under 2 minutes
    python benchmarks/convergence.py --table benchmarks/results/convergence.json  # Markdown

Nets: two VGG-style chains without BatchNorm (11 and 19 conv/linear layers), timm
resnet18 (SGD, momentum 0.9) and a small timm ViT (AdamW); on request (--nets) timm's
convnext_atto (AdamW), efficientnet_b0 and mobilenetv3_small_100 (SGD). For every (net, init, seed)
the init runs once and a copy is trained at each learning rate of the grid, with the
same number of steps for every init. Progress goes to stderr; results to JSON, plots
to PNG. Same seeds -> same numbers (single-threaded, deterministic kernels, every
random draw seeded).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits as D  # noqa: E402

# Budget (measured on this 2-core CPU, one thread per process, batch 32):
# an epoch of 1437 images takes about 0.7 s (vgg11), 1.4 s (vgg19), 2.6 s (resnet18) and
# 2.9 s (vit, patch 8); see README "Budget".
DEFAULT = {
    "seeds": [0, 1, 2],
    "batch_size": 32,
    "nets": {
        "vgg11": dict(optimizer="sgd", lrs=[0.0003, 0.001, 0.003, 0.01, 0.03, 0.1], epochs=4,
                      inits=D.CNN_INITS),
        "vgg19": dict(optimizer="sgd", lrs=[0.0003, 0.001, 0.003, 0.01, 0.03, 0.1], epochs=4,
                      inits=D.CNN_INITS),
        "resnet18": dict(optimizer="sgd", lrs=[0.003, 0.01, 0.03, 0.1, 0.3], epochs=2,
                         inits=D.CNN_INITS),
        "vit": dict(optimizer="adamw", lrs=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], epochs=3,
                    inits=D.VIT_INITS, weight_decay=0.01),
    },
}
QUICK = {
    "seeds": [0],
    "batch_size": 32,
    "nets": {
        "vgg11": dict(optimizer="sgd", lrs=[0.003, 0.01, 0.03], epochs=1, inits=D.CNN_INITS),
        "resnet18": dict(optimizer="sgd", lrs=[0.03], epochs=1, inits=D.CNN_INITS),
        "vit": dict(optimizer="adamw", lrs=[3e-4], epochs=1, inits=D.VIT_INITS,
                    weight_decay=0.01),
    },
}
# Not in the default run (--nets names them): ConvNeXt, EfficientNet and MobileNetV3 as timm
# builds them, timm's own init against ckptinit's default; ConvNeXt with AdamW as it is
# trained, and with --residual-init timm (its LayerScale gammas kept at 1e-6).
FAMILIES = {
    "convnext": dict(optimizer="adamw", lrs=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2], epochs=3,
                     inits=[*D.FAMILY_INITS, "ckpt_timm_residual"], weight_decay=0.05),
    "efficientnet": dict(optimizer="sgd", lrs=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3], epochs=3,
                         inits=D.FAMILY_INITS),
    "mobilenetv3": dict(optimizer="sgd", lrs=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3], epochs=3,
                        inits=D.FAMILY_INITS),
}
COST = {"vgg11": 0.7, "vgg19": 1.4, "resnet18": 2.6, "vit": 2.9,  # s per epoch, to order
        "convnext": 1, "efficientnet": 1, "mobilenetv3": 1}


def build_tasks(cfg: dict) -> list[dict]:
    tasks = []
    for net, nc in cfg["nets"].items():
        for init in nc["inits"]:
            for seed in cfg["seeds"]:
                tasks.append({"net": net, "init": init, "seed": seed, "lrs": nc["lrs"],
                              "epochs": nc["epochs"], "optimizer": nc["optimizer"],
                              "batch_size": cfg["batch_size"],
                              "weight_decay": nc.get("weight_decay", 0.0)})
    # longest first, for two workers to finish together
    tasks.sort(key=lambda t: -COST.get(t["net"], 1) * t["epochs"] * len(t["lrs"]))
    return tasks


def run_sweep(tasks: list[dict], workers: int) -> list[dict]:
    D.log(f"{len(tasks)} cells on {workers} worker(s)")
    if workers <= 1:
        cells = [D.run_cell(t) for t in tasks]
    else:
        with mp.get_context("spawn").Pool(workers, maxtasksperchild=8) as pool:
            cells = list(pool.imap_unordered(D.run_cell, tasks))
    cells.sort(key=lambda c: (c["net"], c["init"], c["seed"]))
    return cells


# --------------------------------------------------------------------------- summary


def _mean(v):
    return sum(v) / len(v) if v else float("nan")


def _std(v):
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def summarise(cells: list[dict], window: float = 0.05) -> dict:
    """Per net and init: mean/std accuracy per lr, best lr, stable lr range, step-0 stats."""
    out: dict = {}
    for c in cells:
        out.setdefault(c["net"], {}).setdefault(c["init"], []).append(c)
    summary = {}
    for net, by_init in out.items():
        summary[net] = {}
        for init, cs in by_init.items():
            s: dict = {"seeds": len(cs)}
            if not all(c["init_ok"] for c in cs):
                bad = [c for c in cs if not c["init_ok"]]
                s["unavailable"] = all(c.get("unavailable") for c in bad)
                s["init_error"] = bad[0]["init_error"]
                if len(bad) == len(cs):
                    summary[net][init] = s
                    continue
                cs = [c for c in cs if c["init_ok"]]
            per_lr = {}
            for lr in [r["lr"] for r in cs[0]["runs"]]:
                runs = [r for c in cs for r in c["runs"] if r["lr"] == lr]
                accs = [r["acc"] for r in runs]
                per_lr[lr] = {"mean": _mean(accs), "std": _std(accs), "min": min(accs),
                              "max": max(accs), "diverged": sum(r["diverged"] for r in runs),
                              "n": len(runs)}
            best_lr = max(per_lr, key=lambda lr: (per_lr[lr]["mean"], -lr))
            best = per_lr[best_lr]["mean"]
            stable = [lr for lr in per_lr if per_lr[lr]["mean"] >= best - window]
            lrs = sorted(per_lr)
            contiguous = stable == lrs[lrs.index(min(stable)): lrs.index(max(stable)) + 1]
            s.update({
                "per_lr": {str(k): v for k, v in per_lr.items()}, "best_lr": best_lr,
                "best_mean": best, "best_std": per_lr[best_lr]["std"],
                "best_min": per_lr[best_lr]["min"], "best_max": per_lr[best_lr]["max"],
                "stable_lrs": stable, "stable_lo": min(stable), "stable_hi": max(stable),
                "stable_contiguous": contiguous, "trains": best >= 0.2,
                "diverged_runs": sum(v["diverged"] for v in per_lr.values()),
                "runs": sum(v["n"] for v in per_lr.values()),
                "logit_std_step0": _mean([c["logit_std_step0"] for c in cs]),
                "acc_step0": _mean([c["acc_step0"] for c in cs]),
                "init_seconds": _mean([c["init_seconds"] for c in cs]),
                "init_cpu_seconds": _mean([c.get("init_cpu_seconds") or 0.0 for c in cs]),
                "train_cpu_seconds": sum(r.get("cpu_seconds", 0.0) for c in cs
                                         for r in c["runs"]),
                "rate_spread_after": _mean([c["init_report"]["rate_spread_after"] for c in cs
                                            if c.get("init_report") and isinstance(
                                                c["init_report"].get("rate_spread_after"),
                                                float)]) if any(
                    c.get("init_report") for c in cs) else None,
            })
            summary[net][init] = s
    return summary


# --------------------------------------------------------------------------- rendering


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def edge(lr: float, lrs: list[float]) -> str:
    """A best lr at the end of the grid says the grid did not bracket the optimum."""
    if len(lrs) > 1 and lr == min(lrs):
        return " (grid's low end)"
    if len(lrs) > 1 and lr == max(lrs):
        return " (grid's high end)"
    return ""


def markdown(result: dict) -> str:
    """The tables of README's convergence section, from a result JSON."""
    cfg, summary = result["config"], result["summary"]
    lines = []
    for net, nc in cfg["nets"].items():
        if net not in summary:
            continue
        lrs = nc["lrs"]
        lines.append(f"**{net}** ({nc['optimizer'].upper()}, {nc['epochs']} epochs of batch "
                     f"{cfg['batch_size']}, lr grid {', '.join(map(_fmt_lr, lrs))}, "
                     f"{len(cfg['seeds'])} seeds)\n")
        lines.append("| init | best test acc % (mean ± sd, min–max) | best lr | lr range within "
                     "5 pts | diverged runs | logit std, step 0 | init CPU s |")
        lines.append("|---|---|---|---|---|---|---|")
        for init in nc["inits"]:
            s = summary[net].get(init)
            label = D.INIT_LABELS.get(init, init)
            if s is None:
                continue
            if "best_mean" not in s:
                why = "unavailable" if s.get("unavailable") else "init failed"
                lines.append(f"| {label} | {why}: {D.one_line(s.get('init_error'))} | | | | | |")
                continue
            if not s["trains"]:
                rng = "none (never above 20 %)"
            else:
                rng = (f"{_fmt_lr(s['stable_lo'])}–{_fmt_lr(s['stable_hi'])} "
                       f"({s['stable_hi'] / s['stable_lo']:.0f}x)" if s["stable_hi"] >
                       s["stable_lo"] else f"{_fmt_lr(s['stable_lo'])} only")
                if not s["stable_contiguous"]:
                    rng += ", gaps"
            lines.append(
                f"| {label} | {100 * s['best_mean']:.1f} ± {100 * s['best_std']:.1f} "
                f"({100 * s['best_min']:.1f}–{100 * s['best_max']:.1f}) | "
                f"{_fmt_lr(s['best_lr'])}{edge(s['best_lr'], lrs)} | {rng} | "
                f"{s['diverged_runs']}/{s['runs']} | "
                f"{s['logit_std_step0']:.3g} | {s['init_cpu_seconds']:.2f} |")
        lines.append("")
        # mean accuracy per lr
        lines.append("| mean acc % per lr | " + " | ".join(map(_fmt_lr, lrs)) + " |")
        lines.append("|---|" + "---|" * len(lrs))
        for init in nc["inits"]:
            s = summary[net].get(init)
            if not s or "per_lr" not in s:
                continue
            cells = []
            for lr in lrs:
                v = s["per_lr"][str(lr)]
                cells.append(f"{100 * v['mean']:.1f}" + (f" ({v['diverged']} NaN)"
                                                          if v["diverged"] else ""))
            lines.append(f"| {D.INIT_LABELS.get(init, init)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _smooth(v: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= k:
            acc -= v[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(result: dict, path: Path) -> None:
    """Training loss at each init's best lr (mean over seeds, smoothed), and mean test
    accuracy against lr, one row per net."""
    from matplotlib.figure import Figure

    cfg, summary, cells = result["config"], result["summary"], result["cells"]
    nets = [n for n in cfg["nets"] if n in summary]
    fig = Figure(figsize=(12, 3.6 * len(nets)))
    axes = fig.subplots(len(nets), 2, squeeze=False)
    for row, net in enumerate(nets):
        ax_l, ax_a = axes[row]
        inits = cfg["nets"][net]["inits"]
        for k, init in enumerate(inits):
            style = dict(ls=["-", "--", ":"][(k // 10) % 3], lw=1.2)
            s = summary[net].get(init)
            if not s or "best_lr" not in s:
                continue
            label = D.INIT_LABELS.get(init, init)
            curves = [r["losses"] for c in cells if c["net"] == net and c["init"] == init
                      for r in c["runs"] if r["lr"] == s["best_lr"] and not r["diverged"]]
            if curves:
                n = min(map(len, curves))
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
                ax_l.plot(_smooth(mean, 10), label=f"{label} (lr {s['best_lr']:g})", **style)
            lrs = cfg["nets"][net]["lrs"]
            ax_a.plot(lrs, [100 * s["per_lr"][str(lr)]["mean"] for lr in lrs], marker="o",
                      label=label, **style)
        ax_l.set_yscale("log")
        ax_l.set_xlabel("step")
        ax_l.set_ylabel("training loss (smoothed, 10 steps)")
        ax_l.set_title(f"{net}: loss at each init's best lr")
        ax_l.legend(fontsize=7)
        ax_a.set_xscale("log")
        ax_a.set_xlabel("learning rate")
        ax_a.set_ylabel("test accuracy %, mean over seeds")
        ax_a.set_title(f"{net}: accuracy against lr (NaN counts as 10 %)")
        ax_a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, fewer lrs, one epoch")
    ap.add_argument("--nets", help="comma-separated subset of vgg11,vgg19,resnet18,vit (the "
                    "default run), convnext,efficientnet,mobilenetv3 (on request)")
    ap.add_argument("--inits", help="comma-separated subset of the inits")
    ap.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    ap.add_argument("--lrs", help="comma-separated learning rates for every net")
    ap.add_argument("--epochs", type=int, help="override every net's epochs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--results-dir", help="where convergence.json/.png go (default "
                                          "benchmarks/results/default or .../quick)")
    ap.add_argument("--table", metavar="JSON", help="print the Markdown tables of a result "
                                                    "file and exit")
    ap.add_argument("--replot", metavar="JSON", help="redraw the PNG beside a result file")
    args = ap.parse_args()
    if args.table:
        import json

        print(markdown(json.loads(Path(args.table).read_text())))
        return
    if args.replot:
        import json

        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return
    import copy

    cfg = copy.deepcopy(QUICK if args.quick else DEFAULT)
    if args.nets:
        every = {**FAMILIES, **cfg["nets"]}
        cfg["nets"] = {n: copy.deepcopy(every[n]) for n in args.nets.split(",")}
    if args.inits:
        keep = args.inits.split(",")  # any init _digits knows, in this order
        for nc in cfg["nets"].values():
            nc["inits"] = list(keep)
    if args.lrs:
        for nc in cfg["nets"].values():
            nc["lrs"] = [float(v) for v in args.lrs.split(",")]
    if args.seeds:
        cfg["seeds"] = list(range(args.seeds))
    if args.epochs:
        for nc in cfg["nets"].values():
            nc["epochs"] = args.epochs
    out = D.results_dir(args.results_dir, args.quick) / "convergence.json"
    t0 = time.time()
    prov = D.provenance()
    cells = run_sweep(build_tasks(cfg), args.workers)
    result = {"provenance": prov, "config": cfg, "vit_kwargs": D.VIT_KW,
              "data": {"train": 1437, "test": D.N_TEST, "size": D.SIZE,
                       "calibration": [D.N_CALIB, D.N_HOLDOUT]},
              "wall_seconds": time.time() - t0, "cells": cells}
    result["summary"] = summarise(cells)
    D.write_json(result, out)
    plot(result, out.with_suffix(".png"))
    D.log(f"done in {result['wall_seconds']:.0f} s: {out}, {out.with_suffix('.png')}")
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Issue 10, part 3: ckptinit on a self-supervised checkpoint (the paper's pre-training use).

    python benchmarks/pretrained.py            # vgg11 (library) and resnet18 (CLI)
    python benchmarks/pretrained.py --quick
    python benchmarks/pretrained.py --table benchmarks/results/pretrained.json

1. Pretext: rotation prediction (4 classes: 0/90/180/270 degrees) on the digits training
   images, from Kaiming (vgg11, the no-BN chain of convergence.py) or timm's init
   (resnet18); saved as a safetensors checkpoint.
2. Fine-tuning for the 10 digit classes, from
   (i)  the pretext weights as they are, with a new 10-class head (framework default init);
   (ii) the same weights after ckptinit: for vgg11 (a custom nn.Module) the library,
        `rescale(model, images, RescaleOptions(), fresh={"head"})` (the loaded units get
        the between-layer step only, the new head the within-layer step); for resnet18 the
        CLI, `ckptinit rescale pretext.safetensors --arch resnet18 --num-classes 10
        --data <PNG folder of the calibration digits>`.
   Same lr grid, budget and seeds for both; calibration images are the seed's subset of
   the training images (as in convergence.py).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits as D  # noqa: E402
from convergence import _fmt_lr, _mean, _std, edge  # noqa: E402

DEFAULT = {
    "seeds": [0, 1, 2],
    "batch_size": 32,
    "nets": {
        "vgg11": dict(pretext=dict(init="kaiming", lr=0.01, epochs=6),
                      lrs=[0.0003, 0.001, 0.003, 0.01, 0.03, 0.1], epochs=4),
        "resnet18": dict(pretext=dict(init="default", lr=0.03, epochs=3),
                         lrs=[0.003, 0.01, 0.03, 0.1, 0.3], epochs=2),
    },
}
QUICK = {
    "seeds": [0],
    "batch_size": 32,
    "nets": {
        "vgg11": dict(pretext=dict(init="kaiming", lr=0.01, epochs=2), lrs=[0.003, 0.03],
                      epochs=1),
        "resnet18": dict(pretext=dict(init="default", lr=0.03, epochs=1), lrs=[0.03],
                         epochs=1),
    },
}
VARIANTS = ["pretext", "pretext_ckptinit"]
SCRATCH = {"vgg11": ["kaiming", "ckpt_default", "ckpt_kmeans"],
           "resnet18": ["default", "ckpt_default"]}  # reference rows from convergence.py
LABELS = {"pretext": "pretext weights, new head (default init)",
          "pretext_ckptinit": "pretext weights + ckptinit rescale"}


def rotate(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator):
    """Each image rotated by k * 90 degrees, k drawn from `g`; the label becomes k."""
    k = torch.randint(0, 4, (len(xb),), generator=g)
    out = xb.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(xb[sel], r, dims=(2, 3))
    return out, k


def all_rotations(x: torch.Tensor):
    xs = [torch.rot90(x, r, dims=(2, 3)) for r in range(4)]
    return torch.cat(xs), torch.arange(4).repeat_interleave(len(x))


def pretext(net: str, pc: dict, batch_size: int, path: Path) -> dict:
    """Train the rotation task from seed 0 and save the weights (safetensors)."""
    from safetensors.torch import save_file

    D.setup_determinism()
    data = D.load_digits32()
    torch.manual_seed(0)
    model = D.make_net(net, num_classes=4)
    D.apply_init(model, pc["init"], data, 0)
    tx, ty = all_rotations(data.test_x)
    r = D.train(model, data.train_x, data.train_y, tx, ty, optimizer="sgd", lr=pc["lr"],
                epochs=pc["epochs"], batch_size=batch_size, seed=0, transform=rotate)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", "task": "rotation", "net": net})
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    D.log(f"pretext {net}: rotation accuracy {r['acc']:.3f} ({r['seconds']:.0f} s) -> {path}")
    return {"net": net, **pc, "rotation_test_acc": r["acc"], "diverged": r["diverged"],
            "final_loss": r["final_loss"], "seconds": r["seconds"], "path": str(path),
            "sha256": sha, "losses": r["losses"]}


def write_pngs(data: D.Digits, idx: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(idx.tolist()):
        Image.fromarray(data.train_u8[i], mode="L").save(folder / f"digit_{j:04d}.png")


def cli_rescale(ckpt: Path, seed: int, data: D.Digits, workdir: Path) -> tuple[Path, dict]:
    """`ckptinit rescale` on the pretext checkpoint, calibrated on the seed's digit PNGs."""
    _, _, idx = data.calibration(seed)
    pngs = workdir / f"calib_seed{seed}"
    write_pngs(data, idx, pngs)
    out, rep = workdir / f"rescaled_seed{seed}.safetensors", workdir / f"report_seed{seed}.json"
    cmd = [sys.executable, "-m", "ckptinit", "rescale", str(ckpt), "--arch", "resnet18",
           "--num-classes", "10", "--model-arg", "in_chans=1", "--data", str(pngs),
           "--images", str(D.N_CALIB), "--holdout", str(D.N_HOLDOUT), "--input-size",
           str(D.SIZE), "--mean", *[f"{data.mean:.8f}"] * 3, "--std", *[f"{data.std:.8f}"] * 3,
           "--crop-pct", "1", "--interpolation", "bilinear", "--seed", str(seed),
           "--device", "cpu", "--batch-size", str(D.N_CALIB), "-o", str(out),
           "--report", str(rep), "--force", "-q"]
    env = dict(os.environ, PYTHONPATH=str(D.ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(D.ROOT))
    info = {"cmd": " ".join(cmd), "rc": p.returncode, "seconds": time.perf_counter() - t,
            "stderr_tail": p.stderr[-2000:]}
    if p.returncode != 0:
        raise RuntimeError(f"ckptinit rescale exited {p.returncode}: {p.stderr[-500:]}")
    rd = json.loads(rep.read_text())
    info["report"] = {k: rd.get(k) for k in ("rate_spread_before", "rate_spread_after",
                                              "between_iterations", "converged", "notes",
                                              "function_check", "timings")}
    return out, info


def finetune_cell(task: dict) -> dict:
    from safetensors.torch import load_file

    D.setup_determinism()
    data = D.load_digits32()
    net, variant, seed = task["net"], task["variant"], task["seed"]
    head = D.HEAD[net]
    cell = {"net": net, "variant": variant, "seed": seed, "runs": [], "init_ok": True}
    t = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model = D.make_net(net)  # fresh 10-class head with the framework's default init
        if variant == "pretext_ckptinit" and net == "resnet18":
            with tempfile.TemporaryDirectory() as tmp:
                out, info = cli_rescale(Path(task["ckpt"]), seed, data, Path(tmp))
                model.load_state_dict(load_file(str(out)), strict=True)
            cell["ckptinit"] = info
        else:
            state = {k: v for k, v in load_file(task["ckpt"]).items()
                     if not k.startswith(head + ".")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and all(k.startswith(head + ".") for k in missing), \
                (missing, unexpected)
            if variant == "pretext_ckptinit":
                from ckptinit.api import rescale

                calib, holdout, _ = data.calibration(seed)
                opts, _ = D.rescale_options(seed=seed)
                _, report = rescale(model, calib, opts, fresh={head}, holdout=holdout)
                cell["ckptinit"] = {"report": D.summarise_report(report)}
    except Exception as e:
        cell.update(init_ok=False, init_error=f"{type(e).__name__}: {e}")
        D.log(f"{net} {variant} seed {seed}: FAILED {cell['init_error']}")
        return cell
    cell["init_seconds"] = time.perf_counter() - t
    cell["logit_std_step0"] = D.logit_std(model, data.test_x)
    state0 = copy.deepcopy(model.state_dict())
    for lr in task["lrs"]:
        model.load_state_dict(state0)
        r = D.train(model, data.train_x, data.train_y, data.test_x, data.test_y,
                    optimizer="sgd", lr=lr, epochs=task["epochs"],
                    batch_size=task["batch_size"], seed=seed)
        r["lr"] = lr
        cell["runs"].append(r)
        D.log(f"{net:8s} {variant:16s} seed {seed} lr {lr:g}: acc {r['acc']:.3f}"
              f"{' DIVERGED' if r['diverged'] else ''} ({r['seconds']:.1f}s)")
    return cell


def _pretext_task(args):
    return pretext(*args)


def summarise(cells: list[dict], window: float = 0.05) -> dict:
    by: dict = {}
    for c in cells:
        by.setdefault(c["net"], {}).setdefault(c["variant"], []).append(c)
    out: dict = {}
    for net, vs in by.items():
        out[net] = {}
        for v, cs in vs.items():
            ok = [c for c in cs if c["init_ok"]]
            if not ok:
                out[net][v] = {"init_error": cs[0].get("init_error")}
                continue
            per_lr = {}
            for lr in [r["lr"] for r in ok[0]["runs"]]:
                runs = [r for c in ok for r in c["runs"] if r["lr"] == lr]
                accs = [r["acc"] for r in runs]
                per_lr[str(lr)] = {"mean": _mean(accs), "std": _std(accs), "min": min(accs),
                                   "max": max(accs),
                                   "diverged": sum(r["diverged"] for r in runs)}
            best = max(per_lr, key=lambda k: (per_lr[k]["mean"], -float(k)))
            stable = sorted(float(k) for k in per_lr
                            if per_lr[k]["mean"] >= per_lr[best]["mean"] - window)
            out[net][v] = {"per_lr": per_lr, "best_lr": float(best),
                           "best_mean": per_lr[best]["mean"], "best_std": per_lr[best]["std"],
                           "best_min": per_lr[best]["min"], "best_max": per_lr[best]["max"],
                           "stable_lo": stable[0], "stable_hi": stable[-1],
                           "failed_seeds": len(cs) - len(ok),
                           "diverged_runs": sum(x["diverged"] for x in per_lr.values()),
                           "logit_std_step0": _mean([c["logit_std_step0"] for c in ok]),
                           "init_seconds": _mean([c["init_seconds"] for c in ok])}
    return out


def markdown(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    lines = []
    for net, nc in cfg["nets"].items():
        if net not in summary:
            continue
        p = result["pretext"][net]
        lines.append(f"**{net}**: pretext (rotation, from {p['init']} init, lr {p['lr']:g}, "
                     f"{p['epochs']} epochs) reached {100 * p['rotation_test_acc']:.1f} % "
                     f"rotation accuracy on the test digits; fine-tuning: SGD, "
                     f"{nc['epochs']} epochs, lr grid {', '.join(map(_fmt_lr, nc['lrs']))}, "
                     f"{len(cfg['seeds'])} seeds\n")
        lines.append("| start | best test acc % (mean ± sd, min–max) | best lr | lr range "
                     "within 5 pts | diverged runs | logit std, step 0 | "
                     + " | ".join(f"lr {_fmt_lr(lr)}" for lr in nc["lrs"]) + " |")
        lines.append("|---|---|---|---|---|---|" + "---|" * len(nc["lrs"]))
        rows = [(LABELS[v], summary[net].get(v)) for v in VARIANTS]
        rows += [(f"scratch: {D.INIT_LABELS[i]} (convergence.py)", s)
                 for i, s in result.get("scratch", {}).get(net, {}).items()]
        for label, s in rows:
            if s is None:
                continue
            if "per_lr" not in s:
                lines.append(f"| {label} | failed: {D.one_line(s.get('init_error'))} |")
                continue
            rng = (f"{_fmt_lr(s['stable_lo'])}–{_fmt_lr(s['stable_hi'])}"
                   if s["stable_hi"] > s["stable_lo"] else f"{_fmt_lr(s['stable_lo'])} only")
            per = " | ".join(f"{100 * s['per_lr'][str(lr)]['mean']:.1f}"
                             + (f" ({s['per_lr'][str(lr)]['diverged']} NaN)"
                                if s["per_lr"][str(lr)]["diverged"] else "")
                             for lr in nc["lrs"])
            lines.append(f"| {label} | {100 * s['best_mean']:.1f} ± {100 * s['best_std']:.1f}"
                         f" ({100 * s['best_min']:.1f}–{100 * s['best_max']:.1f}) | "
                         f"{_fmt_lr(s['best_lr'])}{edge(s['best_lr'], nc['lrs'])} | {rng} | "
                         f"{s['diverged_runs']} | "
                         f"{s['logit_std_step0']:.3g} | {per} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nets", help="comma-separated subset of vgg11,resnet18")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--results-dir", help="default benchmarks/results/default or .../quick")
    ap.add_argument("--table", metavar="JSON")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    cfg = copy.deepcopy(QUICK if args.quick else DEFAULT)
    if args.nets:
        cfg["nets"] = {n: cfg["nets"][n] for n in args.nets.split(",")}
    out = D.results_dir(args.results_dir, args.quick) / "pretrained.json"
    ckdir = D.RESULTS / "checkpoints"  # git-ignored; regenerated by this script
    t0 = time.time()
    prov = D.provenance()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=4) as pool:
        jobs = [(net, nc["pretext"], cfg["batch_size"],
                 ckdir / f"pretext_rotation_{net}{'_quick' if args.quick else ''}.safetensors")
                for net, nc in cfg["nets"].items()]
        pre = {p["net"]: p for p in pool.map(_pretext_task, jobs)}
        tasks = [{"net": net, "variant": v, "seed": s, "lrs": nc["lrs"],
                  "epochs": nc["epochs"], "batch_size": cfg["batch_size"],
                  "ckpt": pre[net]["path"]}
                 for net, nc in cfg["nets"].items() for v in VARIANTS for s in cfg["seeds"]]
        tasks.sort(key=lambda t: (t["net"] != "resnet18", t["variant"] != "pretext_ckptinit"))
        cells = list(pool.imap_unordered(finetune_cell, tasks))
    cells.sort(key=lambda c: (c["net"], c["variant"], c["seed"]))
    result = {"provenance": prov, "config": cfg, "pretext": pre, "cells": cells,
              "wall_seconds": time.time() - t0}
    result["summary"] = summarise(cells)
    conv = out.parent / "convergence.json"  # same settings there -> scratch reference rows
    if conv.exists():
        c = json.loads(conv.read_text())
        result["scratch"] = {}
        for net, nc in cfg["nets"].items():
            cn = c["config"]["nets"].get(net)
            if cn and cn["lrs"] == nc["lrs"] and cn["epochs"] == nc["epochs"] and \
                    c["config"]["seeds"] == cfg["seeds"] and \
                    c["config"]["batch_size"] == cfg["batch_size"]:
                result["scratch"][net] = {i: c["summary"][net][i] for i in SCRATCH[net]
                                          if "per_lr" in c["summary"][net].get(i, {})}
    D.write_json(result, out)
    D.log(f"done in {result['wall_seconds']:.0f} s: {out}")
    print(markdown(result))


if __name__ == "__main__":
    main()

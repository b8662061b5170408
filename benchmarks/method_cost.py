"""Cost and multi-batch exactness of the method (issue 9, two "Must show" lines), measured side
by side in one process on this shared machine (ratios, medians of several alternated runs).

(a) vgg11 and resnet50, 256 images in batches of 32, within-layer step only: every unit's
    channel-averaged |mean - beta| and |std - 1| over all 256 images, measured afterwards
    with this script's own forward hooks (no ckptinit code), BatchNorm on batch statistics
    (as the step sees the net) and in eval mode; and the step's time against a plain
    no-grad eval forward over the same 8 batches.
(b) resnet50 and vit_tiny_patch16_224, the default fresh run (within + between) on the
    default number of calibration images, against one forward+backward pass over the same
    images in train mode.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/method_cost.py            # both sections
    PYTHONPATH=$PWD .venv/bin/python benchmarks/method_cost.py --sections b --runs 1

Images are random crops (own RNG) of the shipped sample photos, resized to the model's
default input size and normalised with its pretrained_cfg mean/std; the same tensor goes
to ckptinit and to the plain passes. Results are merged into benchmarks/results/
method_cost.json (a section rerun replaces that section) and rendered to method_cost.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ckptinit.api import rescale
from ckptinit.data import samples_dir
from ckptinit.options import CalibrationOptions, RescaleOptions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOL = 0.02  # issue 9 item 4: channel-averaged |mean - beta| and |std - 1|
A_LIMIT = 4.5  # within-layer time / plain forward (issue 9, Must show)
B_LIMIT = 10.0  # default run / one forward+backward (issue 9, Must show)
UNIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def make_images(model: nn.Module, n: int, seed: int, size: int | None) -> torch.Tensor:
    """n random square crops (30-100% of the short side) of the sample photos, resized to
    the model's input size and normalised with its pretrained_cfg mean/std."""
    cfg = model.pretrained_cfg
    side = size or cfg["input_size"][-1]
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    photos = [Image.open(p).convert("RGB") for p in sorted(samples_dir().glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, side, side)
    for i in range(n):
        im = photos[rng.integers(len(photos))]
        w, h = im.size
        c = int(min(w, h) * rng.uniform(0.3, 1.0))
        x0, y0 = rng.integers(0, w - c + 1), rng.integers(0, h - c + 1)
        crop = im.crop((x0, y0, x0 + c, y0 + c)).resize((side, side), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out[i] = (t - mean) / std
    return out


def fresh(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False)


def batches(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [x[i : i + bs] for i in range(0, len(x), bs)]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def forward(model: nn.Module, xs: list[torch.Tensor]) -> None:
    """A plain eval-mode forward with no graph over every batch."""
    model.eval()
    with torch.no_grad():
        for b in xs:
            model(b)


def forward_backward(model: nn.Module, xs: list[torch.Tensor]) -> None:
    """One train-mode forward+backward pass (L = sum of the outputs) over every batch."""
    model.train()
    for p in model.parameters():
        p.grad = None
    for b in xs:
        model(b).sum().backward()
    for p in model.parameters():
        p.grad = None


# ---- independent measurement: own hooks, float64 per-channel sums over all images ----

def unit_stats(model: nn.Module, xs: list[torch.Tensor], bn_batch_stats: bool,
               beta: float, head_std: float = 1.0) -> dict[str, dict]:
    """Per unit (first call per forward): channel-averaged |mean - beta| and |std - s| of
    its outputs pooled over all batches, in units of s, its goal std (1, or `head_std` for
    the classifier timm's `get_classifier()` names); BatchNorm on batch statistics or in
    eval mode. Every module's mode and every BatchNorm's state are restored afterwards."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    units = {m: n for n, m in model.named_modules()
             if isinstance(m, UNIT_TYPES) and getattr(m, "weight", None) is not None
             and m.weight.dim() >= 2}
    sums: dict[str, list] = {}
    seen: set[str] = set()

    def hook(module, args, z):
        name = units[module]
        if name in seen:
            return
        seen.add(name)
        cdim = z.dim() - 1 if isinstance(module, nn.Linear) else 1
        zc = z.detach().double().movedim(cdim, 0).reshape(z.shape[cdim], -1)
        s = [zc.shape[1], zc.sum(1), (zc * zc).sum(1)]
        if name in sums:
            acc = sums[name]
            acc[0] += s[0]
            acc[1] += s[1]
            acc[2] += s[2]
        else:
            sums[name] = s

    modes = {m: m.training for m in model.modules()}
    bn_state = {m: {k: v.clone() for k, v in m.state_dict().items()}
                for m in model.modules() if isinstance(m, _BatchNorm)}
    model.eval()
    if bn_batch_stats:
        for m in bn_state:
            m.train()
    handles = [m.register_forward_hook(hook) for m in units]
    try:
        with torch.no_grad():
            for x in xs:
                seen.clear()
                model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
        for m, s in bn_state.items():
            m.load_state_dict(s)
    out = {}
    for module, name in units.items():
        if name not in sums:
            continue
        n, s1, s2 = sums[name]
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt()
        goal = head_std if module is head else 1.0
        out[name] = dict(
            goal_std=goal, mean_dev=float((mean - beta).abs().mean() / goal),
            std_dev=float((std - goal).abs().mean() / goal),
            has_bias=getattr(module, "bias", None) is not None, channels=int(mean.numel()))
    return out


def summarize(stats: dict[str, dict]) -> dict:
    def worst(key, pick):
        items = [(s[key], n) for n, s in stats.items() if pick(s)]
        v, n = max(items) if items else (None, None)
        return {"max": v, "unit": n}

    biased = [n for n, s in stats.items() if s["has_bias"]]
    outside_strict = [n for n, s in stats.items() if s["std_dev"] > TOL or s["mean_dev"] > TOL]
    outside_settable = [n for n, s in stats.items()
                        if s["std_dev"] > TOL or (s["has_bias"] and s["mean_dev"] > TOL)]
    return dict(units=len(stats), units_with_bias=len(biased),
                std_dev=worst("std_dev", lambda s: True),
                mean_dev_all=worst("mean_dev", lambda s: True),
                mean_dev_with_bias=worst("mean_dev", lambda s: s["has_bias"]),
                outside_strict=outside_strict, outside_where_settable=outside_settable)


def section_a(args) -> dict:
    res = {}
    for name in args.a_models:
        model0 = fresh(name)
        x = make_images(model0, args.a_images, seed=1, size=args.size)
        xs = batches(x, args.a_batch_size)
        opts = RescaleOptions(between=False, batch_size=args.a_batch_size, device="cpu")
        forward(model0, xs)  # warm-up (allocator, kernels)
        t_fwd, t_within, reports = [], [], []
        model = None
        for run in range(args.runs):  # alternated: the step, then a forward of its result
            m = fresh(name)
            t, (model, report) = timed(rescale, m, x, opts)
            t_within.append(t)
            reports.append(report)
            t, _ = timed(forward, model, xs)  # the weights a user would run
            t_fwd.append(t)
            print(f"[a] {name} run {run + 1}: forward {t_fwd[-1]:.1f}s within {t_within[-1]:.1f}s",
                  file=sys.stderr, flush=True)
        report = reports[-1]
        calib = unit_stats(model, xs, bn_batch_stats=True, beta=opts.beta,
                           head_std=opts.head_std)
        evals = unit_stats(model, xs, bn_batch_stats=False, beta=opts.beta,
                           head_std=opts.head_std)
        statuses = {}
        for u in report.units:
            statuses[u.status] = statuses.get(u.status, 0) + 1
        fwd, wit = statistics.median(t_fwd), statistics.median(t_within)
        summ = summarize(calib)
        res[name] = dict(
            images=len(x), batch_size=args.a_batch_size, input_size=list(x.shape[1:]),
            runs=args.runs, forward_s=t_fwd, within_s=t_within,
            forward_median_s=fwd, within_median_s=wit, ratio=wit / fwd,
            timings_last_run=report.timings, within_passes=[r.within_passes for r in reports],
            within_correction=[r.within_correction for r in reports],
            report_statuses=statuses,
            report_outside_tolerance=[u.name for u in report.units
                                      if u.status == "outside tolerance"],
            calibration_mode=summ, eval_mode=summarize(evals),
            per_unit_calibration_mode=calib, per_unit_eval_mode=evals,
            met_tolerance_strict=not summ["outside_strict"],
            met_tolerance_where_settable=not summ["outside_where_settable"],
            met_time=wit / fwd <= A_LIMIT)
        del model0, model, reports
    return res


def section_b(args) -> dict:
    res = {}
    n_images = args.b_images or CalibrationOptions().images
    n_hold = CalibrationOptions().holdout
    for name in args.b_models:
        model0 = fresh(name)
        x = make_images(model0, n_images, seed=2, size=args.size)
        hold = make_images(model0, n_hold, seed=3, size=args.size)
        bs = args.b_batch_size or RescaleOptions().batch_size
        xs = batches(x, bs)
        opts = RescaleOptions(batch_size=bs, device="cpu")
        forward_backward(model0, xs)  # warm-up
        t_fb, t_full, reports = [], [], []
        for run in range(args.runs):  # alternated: the run, then a pass on its result
            m = fresh(name)
            t, (model, report) = timed(rescale, m, x, opts, holdout=hold)
            t_full.append(t)
            reports.append(report)
            t, _ = timed(forward_backward, model, xs)  # on the weights the run wrote
            t_fb.append(t)
            print(f"[b] {name} run {run + 1}: fwd+bwd {t_fb[-1]:.1f}s full {t_full[-1]:.1f}s",
                  file=sys.stderr, flush=True)
        fb, full = statistics.median(t_fb), statistics.median(t_full)
        report = reports[-1]
        res[name] = dict(
            images=len(x), holdout=len(hold), batch_size=bs, input_size=list(x.shape[1:]),
            runs=args.runs, fwd_bwd_s=t_fb, full_s=t_full, fwd_bwd_median_s=fb,
            full_median_s=full, ratio=full / fb, timings_last_run=report.timings,
            within_passes=report.within_passes,
            between_iterations=[r.between_iterations for r in reports],
            converged=[r.converged for r in reports],
            rate_spread_before=report.rate_spread("before"),
            rate_spread_after=report.rate_spread("after"),
            met_time=full / fb <= B_LIMIT)
        del model0, model, reports
    return res


def warm_up() -> None:
    """One tiny run first, so that no timed run pays for ckptinit's lazy imports."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 14 * 14, 4))
    rescale(net, torch.randn(8, 3, 16, 16), RescaleOptions(batch_size=4, device="cpu"))


def fmt(v, spec=".3g"):
    return "n/a" if v is None else format(v, spec)


def per_run(num: list[float], den: list[float]) -> str:
    """Each alternated run's own ratio: the spread says how much the shared load moved."""
    return " / ".join(f"{a / b:.2f}" for a, b in zip(num, den))


def render(data: dict) -> str:
    lines = ["# Method cost and multi-batch exactness (issue 9)", "",
             "Written by `benchmarks/method_cost.py`; every figure measured in one process on "
             "this shared 2-core CPU (ratios of medians of alternated runs).", ""]
    a = data.get("a")
    if a:
        lines += ["## (a) within-layer step, 256 images in batches of 32", "",
                  f"Command: `{a['command']}`  ", f"Load average at start / end: "
                  f"{a['load_start']} / {a['load_end']}; wall {a['wall_s']:.0f} s", "",
                  f"Tolerance {TOL}: channel-averaged |mean - beta| / s and |std - s| / s over "
                  "all images, s the unit's goal std (1; `--head-std` for the classifier that "
                  "timm's `get_classifier()` names), measured by the script's own hooks after "
                  "the step. Units without "
                  "a bias keep their mean by design (report note \"no bias: mean kept\"), so "
                  "the mean column is given for all units and for units with a bias.", "",
                  "| model | units (with bias) | max \\|std-s\\|/s (BN batch stats) | max "
                  "\\|mean-β\\|/s all / with bias | eval mode: max \\|std-s\\|/s / "
                  "\\|mean-β\\|/s with bias | passes | last correction | report 'outside "
                  "tolerance' | forward s | within s | ratio (≤ 4.5) | per-run ratios |",
                  "|---" * 12 + "|"]
        for name, r in a["models"].items():
            c, e = r["calibration_mode"], r["eval_mode"]
            lines.append(
                f"| {name} | {c['units']} ({c['units_with_bias']}) | "
                f"{fmt(c['std_dev']['max'])} ({c['std_dev']['unit']}) | "
                f"{fmt(c['mean_dev_all']['max'])} ({c['mean_dev_all']['unit']}) / "
                f"{fmt(c['mean_dev_with_bias']['max'])} | {fmt(e['std_dev']['max'])} / "
                f"{fmt(e['mean_dev_with_bias']['max'])} | "
                f"{'/'.join(map(str, r['within_passes']))} | "
                f"{fmt(r['within_correction'][-1])} | "
                f"{len(r['report_outside_tolerance'])} | {fmt(r['forward_median_s'], '.1f')} | "
                f"{fmt(r['within_median_s'], '.1f')} | {fmt(r['ratio'], '.2f')} | "
                f"{per_run(r['within_s'], r['forward_s'])} |")
        lines.append("")
        for name, r in a["models"].items():
            c = r["calibration_mode"]
            lines.append(
                f"- {name}: tolerance over all units incl. the mean of bias-free units: "
                f"{'met' if r['met_tolerance_strict'] else 'NOT met'} "
                f"({len(c['outside_strict'])} outside); where the step can set the mean: "
                f"{'met' if r['met_tolerance_where_settable'] else 'NOT met'} "
                f"({', '.join(c['outside_where_settable']) or 'none outside'}); time: "
                f"{'met' if r['met_time'] else 'NOT met'} ({r['ratio']:.2f} x forward).")
        lines.append("")
    b = data.get("b")
    if b:
        lines += ["## (b) default fresh run (within + between)", "",
                  f"Command: `{b['command']}`  ", f"Load average at start / end: "
                  f"{b['load_start']} / {b['load_end']}; wall {b['wall_s']:.0f} s", "",
                  "| model | images (holdout) | batch | fwd+bwd s | full run s | ratio (≤ 10) "
                  "| per-run ratios | within / between s (last run) | between iterations | "
                  "converged | spread before → after | met |", "|---" * 12 + "|"]
        for name, r in b["models"].items():
            tl = r["timings_last_run"]
            lines.append(
                f"| {name} | {r['images']} ({r['holdout']}) | {r['batch_size']} | "
                f"{fmt(r['fwd_bwd_median_s'], '.1f')} | {fmt(r['full_median_s'], '.1f')} | "
                f"{fmt(r['ratio'], '.2f')} | {per_run(r['full_s'], r['fwd_bwd_s'])} | "
                f"{fmt(tl.get('within'), '.1f')} / "
                f"{fmt(tl.get('between'), '.1f')} | "
                f"{'/'.join(map(str, r['between_iterations']))} | "
                f"{'/'.join(map(str, r['converged']))} | {fmt(r['rate_spread_before'])} → "
                f"{fmt(r['rate_spread_after'])} | {'met' if r['met_time'] else 'NOT met'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="a,b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--a-models", default="vgg11,resnet50")
    ap.add_argument("--a-images", type=int, default=256)
    ap.add_argument("--a-batch-size", type=int, default=32)
    ap.add_argument("--b-models", default="resnet50,vit_tiny_patch16_224")
    ap.add_argument("--b-images", type=int, default=None, help="default: the CLI's --images")
    ap.add_argument("--b-batch-size", type=int, default=None,
                    help="default: the CLI's --batch-size")
    ap.add_argument("--size", type=int, default=None, help="default: the model's input size "
                    "(a smaller size is for smoke tests only)")
    ap.add_argument("--out", default=str(RESULTS / "method_cost.json"))
    args = ap.parse_args()
    args.a_models = args.a_models.split(",")
    args.b_models = args.b_models.split(",")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/method_cost.py " + shlex.join(
        sys.argv[1:])
    warm_up()
    for sec, fn in (("a", section_a), ("b", section_b)):
        if sec not in args.sections.split(","):
            continue
        load0, t0 = os.getloadavg(), time.perf_counter()
        models = fn(args)
        for row in models.values():  # a rerun of some models keeps the others' rows
            row["command"] = command
        models = {**data.get(sec, {}).get("models", {}), **models}
        data[sec] = dict(command=command, torch_threads=torch.get_num_threads(),
                         load_start=[round(v, 2) for v in load0],
                         load_end=[round(v, 2) for v in os.getloadavg()],
                         wall_s=time.perf_counter() - t0, models=models)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(data))  # --sections none: re-render only
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

"""Figures for the data-dependent weight draws (`--weights pca|kmeans`, issue 4).

Each section prints one JSON line per measurement; `--write` also stores them all in
benchmarks/draws.json. Timings are medians of `--runs` runs measured side by side in one
process and reported as ratios too, since this machine is shared.

    .venv/bin/python benchmarks/draws.py --runs 3 --write
    .venv/bin/python benchmarks/draws.py --sections pca,kmeans,determinism

Sections:
  timing       within-layer step with gaussian / pca / kmeans draws vs one forward pass
  pca          mean |off-diagonal correlation| of conv1 outputs on held-out images
  kmeans       max pairwise cosine similarity between the filters of every conv
  determinism  same seed -> identical state_dict (library), and identical files (CLI)
  smoke        kmeans and pca end to end on several architectures: finite outputs, fallbacks
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ckptinit.api import rescale
from ckptinit.data import load_calibration
from ckptinit.options import CalibrationOptions, RescaleOptions

HERE = Path(__file__).resolve().parent
SECTIONS = ("timing", "pca", "kmeans", "determinism", "smoke")
RESULTS: list[dict] = []


def emit(kind: str, **fields) -> None:
    row = {"measure": kind, **fields}
    RESULTS.append(row)
    print(json.dumps(row, default=float), flush=True)


def fresh_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # timm's init draws from the global generator
    return timm.create_model(name, pretrained=False)


def calibration(model: nn.Module, args) -> tuple[torch.Tensor, torch.Tensor]:
    opts = CalibrationOptions(images=args.images, input_size=args.size)
    calib = load_calibration(model, opts)
    return calib.images, calib.holdout


def within(weights: str, seed: int = 0, batch_size: int = 64) -> RescaleOptions:
    return RescaleOptions(between=False, weights=weights, seed=seed, batch_size=batch_size)


def convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------------------- sections


def section_timing(args) -> None:
    """Within-layer step (between=False) per draw, side by side, vs one forward pass."""
    template = fresh_model(args.model)
    images, _ = calibration(template, args)
    draws = ("gaussian", "pca", "kmeans")
    times: dict[str, list[float]] = {d: [] for d in (*draws, "forward")}
    reasons: dict[str, dict] = {}
    for _ in range(args.runs):
        model = copy.deepcopy(template).eval()
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(images), 64):
                model(images[i : i + 64])
        times["forward"].append(time.perf_counter() - t)
        for d in draws:  # interleaved, so that the load of the machine hits all alike
            model = copy.deepcopy(template)
            t = time.perf_counter()
            _, report = rescale(model, images, within(d))
            times[d].append(time.perf_counter() - t)
            reasons[d] = fallbacks(report)
        print(json.dumps({"run": len(times["forward"]), **{k: round(v[-1], 2)
                          for k, v in times.items()}}), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit("timing", model=args.model, images=len(images), size=tuple(images.shape[-2:]),
         runs=args.runs, threads=torch.get_num_threads(),
         forward_s=med["forward"], gaussian_s=med["gaussian"], pca_s=med["pca"],
         kmeans_s=med["kmeans"],
         kmeans_over_gaussian=med["kmeans"] / med["gaussian"],
         pca_over_gaussian=med["pca"] / med["gaussian"],
         gaussian_over_forward=med["gaussian"] / med["forward"],
         pca_over_forward=med["pca"] / med["forward"],
         kmeans_over_forward=med["kmeans"] / med["forward"],
         all_s={k: [round(x, 3) for x in v] for k, v in times.items()},
         fallbacks={d: len(r) for d, r in reasons.items()})


def mean_abs_offdiag_corr(y: torch.Tensor) -> float:
    """y: (N, C, ...) outputs; channel correlation pooled over batch and positions."""
    z = y.detach().transpose(0, 1).reshape(y.shape[1], -1).double()
    c = torch.corrcoef(z)
    off = c[~torch.eye(len(c), dtype=torch.bool)]
    return float(off.nan_to_num(0.0).abs().mean())


def first_conv_outputs(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: out.__setitem__("y", o.detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return out["y"]


def section_pca(args) -> None:
    """pca vs gaussian draw on resnet18's conv1: channel correlation on held-out images."""
    name = "resnet18"
    template = fresh_model(name)
    images, holdout = calibration(template, args)
    corr = {}
    for d in ("gaussian", "pca"):
        model, _ = rescale(copy.deepcopy(template), images, within(d, seed=args.seed))
        corr[d] = mean_abs_offdiag_corr(first_conv_outputs(model, "conv1", holdout))
        corr[f"{d}_fit"] = mean_abs_offdiag_corr(first_conv_outputs(model, "conv1", images))
    emit("pca_decorrelation", model=name, layer="conv1", images=len(images),
         holdout=len(holdout), size=tuple(images.shape[-2:]), seed=args.seed,
         gaussian_heldout=corr["gaussian"], pca_heldout=corr["pca"],
         gaussian_calib=corr["gaussian_fit"], pca_calib=corr["pca_fit"],
         gaussian_over_pca=corr["gaussian"] / corr["pca"])


def max_cos(w: torch.Tensor) -> float:
    """Max cosine similarity between two filters of the same group (conv weight rows)."""
    # the filters of one group see the same input channels; compare within each group
    u = F.normalize(w.detach().reshape(w.shape[0], -1).double(), dim=1)
    cos = u @ u.T
    cos.fill_diagonal_(-2)
    return float(cos.max())


def group_max_cos(m: nn.Conv2d) -> float | None:
    w = m.weight.detach()
    per = w.shape[0] // m.groups
    if per < 2:
        return None  # one filter per group (depthwise): nothing to compare
    return max(max_cos(w[g * per : (g + 1) * per]) for g in range(m.groups))


def section_kmeans(args) -> None:
    """Max pairwise cosine between k-means filters, per conv of resnet18 and overall."""
    name = "resnet18"
    template = fresh_model(name)
    images, _ = calibration(template, args)
    per_layer = {}
    for d in ("kmeans", "gaussian"):
        model, report = rescale(copy.deepcopy(template), images, within(d, seed=args.seed))
        cos = {n: group_max_cos(m) for n, m in convs(model)}
        cos = {n: c for n, c in cos.items() if c is not None}
        per_layer[d] = cos
        used = {r.name: r.draw for r in report.units}
        own = {n: c for n, c in cos.items() if used.get(n) == d}  # drawn as asked
        worst = max(cos, key=cos.get)
        worst_own = max(own, key=own.get) if own else None
        emit("filter_max_cos", model=name, weights=d, convs=len(cos), max=cos[worst],
             argmax=worst, drawn_as_asked=len(own),
             max_drawn_as_asked=own[worst_own] if own else None, argmax_drawn_as_asked=worst_own,
             first_layers={n: round(c, 4) for n, c in list(cos.items())[:6]},
             fallbacks=fallbacks(report))
    emit("filter_max_cos_per_layer", model=name,
         per_layer={n: {d: round(per_layer[d][n], 4) for d in per_layer}
                    for n in per_layer["kmeans"]})


def state_equal(a: nn.Module, b: nn.Module) -> tuple[bool, list[str]]:
    sa, sb = a.state_dict(), b.state_dict()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    return sa.keys() == sb.keys() and not diff, diff


def section_determinism(args) -> None:
    """Same seed twice -> identical state_dicts; the CLI twice -> byte-identical files."""
    name = "resnet18"
    for d in ("kmeans", "pca"):
        runs = []
        for _ in range(2):
            template = fresh_model(name)
            images, _ = calibration(template, args)
            runs.append(rescale(template, images, within(d, seed=args.seed))[0])
        equal, diff = state_equal(*runs)
        emit("determinism_library", model=name, weights=d, seed=args.seed, identical=equal,
             tensors=len(runs[0].state_dict()), differing=diff[:5])
    if args.no_cli:
        return
    cli = Path(sys.executable).with_name("ckptinit")
    with tempfile.TemporaryDirectory() as tmp:
        outs, codes, secs = [], [], []
        for i in range(2):
            out = Path(tmp) / f"run{i}.safetensors"
            cmd = [str(cli), "rescale", name, "--weights", "kmeans", "--no-between",
                   "-o", str(out), "--force"]
            if args.size:
                cmd += ["--input-size", str(args.size)]
            if args.images != CalibrationOptions.images:
                cmd += ["--images", str(args.images)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            secs.append(time.perf_counter() - t)
            codes.append(proc.returncode)
            outs.append(out)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        same = all(c == 0 for c in codes) and subprocess.run(
            ["cmp", "-s", str(outs[0]), str(outs[1])]).returncode == 0
        emit("determinism_cli", command=" ".join(cmd[:-3] + ["-o", "OUT", "--force"]),
             exit_codes=codes, identical_files=same, seconds=[round(s, 1) for s in secs])


def fallbacks(report) -> dict[str, str]:
    return {r.name: f"{r.status}: {r.draw}: {r.draw_reason}" for r in report.units
            if r.status == "fallback" or r.draw_reason}


def section_smoke(args) -> None:
    """kmeans and pca end to end: finite eval outputs; which units fell back and why."""
    for name in args.smoke_models.split(","):
        template = fresh_model(name)
        images, holdout = calibration(template, args)
        for d in ("kmeans", "pca"):
            between = name not in args.within_only.split(",")
            opts = RescaleOptions(between=between, weights=d, seed=args.seed)
            t = time.perf_counter()
            model, report = rescale(copy.deepcopy(template), images, opts, holdout=holdout)
            secs = time.perf_counter() - t
            model.eval()
            with torch.no_grad():
                y = model(holdout)
            emit("smoke", model=name, weights=d, between=between, seconds=round(secs, 1),
                 finite=bool(torch.isfinite(y).all()), logits_std=float(y.std()),
                 units=len(report.units),
                 drawn=sum(r.draw == d for r in report.units),
                 status={s: sum(r.status == s for r in report.units)
                         for s in sorted({r.status for r in report.units})},
                 converged=report.converged if between else None,
                 fallbacks=fallbacks(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--model", default="resnet50", help="model for the timing section")
    ap.add_argument("--runs", type=int, default=3, help="timing runs (median)")
    ap.add_argument("--images", type=int, default=CalibrationOptions.images)
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke-models", default="resnet18,mobilenetv3_small_100,vgg11")
    ap.add_argument("--within-only", default="",
                    help="smoke models to run without the between-layer step")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI determinism check")
    ap.add_argument("--write", action="store_true", help="also write benchmarks/draws.json")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    t0 = time.perf_counter()
    for s in sections:
        t = time.perf_counter()
        globals()[f"section_{s}"](args)
        print(json.dumps({"section": s, "seconds": round(time.perf_counter() - t, 1)}),
              file=sys.stderr, flush=True)
    if args.write:
        meta = dict(argv=sys.argv[1:], torch=torch.__version__, timm=timm.__version__,
                    python=platform.python_version(), threads=torch.get_num_threads(),
                    cpus=os.cpu_count(), load=[round(x, 2) for x in os.getloadavg()],
                    seconds=round(time.perf_counter() - t0, 1))
        path = HERE / "draws.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        # sections run separately accumulate; a section run again replaces its rows
        kinds = {r["measure"] for r in RESULTS}
        rows = [r for r in old.get("results", []) if r["measure"] not in kinds] + RESULTS
        runs = [m for m in old.get("runs", []) if set(m["sections"]) - set(sections)]
        runs.append({"sections": sections, **meta})
        path.write_text(json.dumps({"runs": runs, "results": rows}, indent=1,
                                   default=float) + "\n")


if __name__ == "__main__":
    main()

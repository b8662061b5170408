"""Issue 10, part 4: per-layer change rates before and after, the small-scale analogue of
the paper's figure (relative change rate ||dL/dW|| / ||W|| of every layer under a random
linear loss).

    python benchmarks/rate_plots.py            # CLI on timm resnet18 and vgg11, library on
                                               # the digits nets
    python benchmarks/rate_plots.py --quick

* CLI, timm models on ckptinit's sample photos: `ckptinit measure NAME --plot` (timm's
  init) and `ckptinit rescale NAME --plot --report` (after the within-layer step, i.e.
  the report's "before", and after the between-layer step). resnet18 at the default
  224 px and 64 images; vgg11 at 64 px and 32 images (its 4096-wide linears make the
  backward pass the cost).
* Library, the digits nets of convergence.py (calibration: 128 training digits, seed 0):
  `ckptinit.api.measure` after every init, all with the same images and gradient draws.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits as D  # noqa: E402

OUT = D.RESULTS / "default" / "rates"  # set by main()
CLI_MODELS = {
    "resnet18": ["--images", "64"],
    "vgg11": ["--images", "32", "--holdout", "8", "--input-size", "64"],
}
CLI_QUICK = {"resnet18": ["--images", "16", "--holdout", "8", "--input-size", "112"]}
LIB_NETS = ["vgg11", "vgg19", "resnet18"]
LIB_INITS = ["default", "normal001", "kaiming", "lsuv", "ckpt_within", "ckpt_default",
             "ckpt_kmeans"]


def cli(args: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(D.ROOT))
    cmd = [sys.executable, "-m", "ckptinit", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(D.ROOT))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-800:]}")
    return time.perf_counter() - t


def unit_rates(report: dict, key: str) -> list[tuple[str, float | None]]:
    out = []
    for u in report["units"]:
        r = u.get(key)
        out.append((u["name"], float(r) if isinstance(r, (int, float)) and r > 0 else None))
    return out


def spread(rates: list[tuple[str, float | None]]) -> float | None:
    v = [r for _, r in rates if r is not None and math.isfinite(r)]
    return max(v) / min(v) if len(v) > 1 else None


def plot_lines(series: dict[str, list[tuple[str, float | None]]], title: str, path: Path):
    from matplotlib.figure import Figure

    names = [n for n, _ in next(iter(series.values()))]
    fig = Figure(figsize=(max(6.0, 0.28 * len(names) + 3) + 4, 4.2))
    ax = fig.subplots()
    for label, rates in series.items():
        xs = [i for i, (_, r) in enumerate(rates) if r is not None]
        ys = [r for _, r in rates if r is not None]
        sp = spread(rates)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2,
                label=f"{label} (spread {sp:.3g}x, {len(ys)} units)" if sp else label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("change rate ||dL/dW|| / ||W||")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def cli_section(models: dict[str, list[str]]) -> dict:
    out = {}
    for name, extra in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            before, after = Path(tmp) / "before.json", Path(tmp) / "after.json"
            D.log(f"ckptinit measure {name}")
            t_m = cli(["measure", name, *extra, "--seed", "0", "--device", "cpu",
                       "--report", str(before), "--plot", str(OUT / f"cli_{name}_measure.png"),
                       "-q"])
            D.log(f"ckptinit rescale {name}")
            t_r = cli(["rescale", name, *extra, "--seed", "0", "--device", "cpu",
                       "-o", str(Path(tmp) / "out.safetensors"), "--report", str(after),
                       "--plot", str(OUT / f"cli_{name}_rescale.png"), "-q"])
            b, a = json.loads(before.read_text()), json.loads(after.read_text())
        series = {"timm init (ckptinit measure)": unit_rates(b, "rate_before"),
                  "gaussian + within-layer (rescale, before between)":
                      unit_rates(a, "rate_before"),
                  "within + between (rescale, after)": unit_rates(a, "rate_after")}
        plot_lines(series, f"timm {name}, sample photos {' '.join(extra)}",
                   OUT / f"cli_{name}_combined.png")
        out[name] = {"args": extra, "measure_seconds": t_m, "rescale_seconds": t_r,
                     "spread": {k: spread(v) for k, v in series.items()},
                     "units_with_rate": {k: sum(r is not None for _, r in v)
                                         for k, v in series.items()},
                     "rates": series, "rescale_notes": a.get("notes"),
                     "rate_spread_after_report": a.get("rate_spread_after")}
        D.log(f"{name}: spreads {out[name]['spread']}")
    return out


def lib_section(nets: list[str], inits: list[str]) -> dict:
    from ckptinit.api import measure

    D.setup_determinism()
    data = D.load_digits32()
    calib, _, _ = data.calibration(0)
    out = {}
    for net in nets:
        series, info = {}, {}
        for init in inits:
            torch.manual_seed(0)
            model = D.make_net(net)
            r = D.apply_init(model, init, data, 0)
            if not r["ok"]:
                info[init] = {"error": r.get("error")}
                continue
            opts, _ = D.rescale_options(seed=123, grad_batches=4)
            rep = measure(model, calib, opts).to_dict()
            rates = unit_rates(rep, "rate_before")
            series[D.INIT_LABELS[init]] = rates
            info[init] = {"spread": spread(rates), "rates": rates}
            D.log(f"{net} {init}: change-rate spread {spread(rates)}")
        plot_lines(series, f"digits {net} (32 px), ckptinit.api.measure after each init",
                   OUT / f"lib_{net}.png")
        out[net] = info
    return out


def markdown(result: dict) -> str:
    lines = ["| model | init | change-rate spread (max/min) | units with a rate |",
             "|---|---|---|---|"]
    for name, r in result.get("cli", {}).items():
        for k, v in r["spread"].items():
            lines.append(f"| timm {name} ({' '.join(r['args'])}) | {k} | "
                         f"{v:.3g}x | {r['units_with_rate'][k]} |" if v else
                         f"| timm {name} | {k} | — | {r['units_with_rate'][k]} |")
    for net, by in result.get("lib", {}).items():
        for init, v in by.items():
            sp = v.get("spread")
            n = sum(r is not None for _, r in v.get("rates", []))
            lines.append(f"| digits {net} | {D.INIT_LABELS[init]} | "
                         + (f"{sp:.3g}x | {n} |" if sp else f"— ({v.get('error')}) | {n} |"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="resnet18 at 112 px only (CLI), "
                                                         "vgg11 digits net only (library)")
    ap.add_argument("--results-dir", help="default benchmarks/results/default or .../quick")
    ap.add_argument("--table", metavar="JSON")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    global OUT
    out = D.results_dir(args.results_dir, args.quick) / "rates.json"
    OUT = out.parent / "rates"
    t0 = time.time()
    result = {"provenance": D.provenance()}
    result["lib"] = lib_section(["vgg11"] if args.quick else LIB_NETS, LIB_INITS)
    result["cli"] = cli_section(CLI_QUICK if args.quick else CLI_MODELS)
    result["wall_seconds"] = time.time() - t0
    D.write_json(result, out)
    D.log(f"done in {result['wall_seconds']:.0f} s: {out}, plots in {OUT}")
    print(markdown(result))


if __name__ == "__main__":
    main()

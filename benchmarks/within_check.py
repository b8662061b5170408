"""Issue 10, found on the way: does the model ckptinit's within-layer step leaves behind have
what its report says (every unit's channels at mean beta, std 1 on the calibration images)?

    python benchmarks/within_check.py            # digits vgg11 + resnet18, every draw
    python benchmarks/within_check.py --table benchmarks/results/<dir>/within_check.json

`rescale(model, calib, RescaleOptions(weights=DRAW, between=False))`, then one plain
forward pass over the same calibration images with hooks on every unit: per unit, the
spread of the per-channel means (units with a bias; the others keep their mean) and the
mean per-channel std, next to the report's mean_after/std_after. Run with the calibration
set in one batch (batch_size 128: the single-pass path of DESIGN 1.4) and in two batches
(batch_size 64: the multi-pass path).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _digits as D  # noqa: E402

DRAWS = ["gaussian", "orthogonal", "pca", "kmeans"]


@torch.no_grad()
def actual_stats(model, images):
    got = {}
    hooks = [m.register_forward_hook(
        lambda mod, i, out, n=n: got.__setitem__(n, out.detach().transpose(0, 1).reshape(
            out.shape[1], -1).double())) for n, m in D.affine_units(model)]
    model.train()
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return {n: (z.mean(1), z.std(1, unbiased=False)) for n, z in got.items()}


def check(net: str, draw: str, batch_size: int) -> dict:
    from ckptinit.api import rescale

    D.setup_determinism()
    data = D.load_digits32()
    calib, holdout, _ = data.calibration(0)
    torch.manual_seed(0)
    model = D.make_net(net)
    opts, _ = D.rescale_options(seed=0, weights=draw, between=False, batch_size=batch_size)
    _, report = rescale(model, calib, opts, holdout=holdout)
    stats = actual_stats(model, calib)
    affine = D.affine_units(model)
    has_bias = {n: m.bias is not None for n, m in affine}
    head = affine[-1][0]  # these nets end in their classifier: its goal is --head-std
    units = []
    for u in report.units:
        mu, sd = stats[u.name]
        goal_std = opts.head_std if u.name == head else 1.0
        units.append({"unit": u.name, "draw": u.draw, "status": u.status,
                      "has_bias": has_bias[u.name],
                      "report_mean": u.mean_after, "report_std": u.std_after,
                      "mean_min": float(mu.min()), "mean_max": float(mu.max()),
                      "std_mean": float(sd.mean()),
                      # a unit without a bias keeps its mean (DESIGN 1.1): std only
                      "worst_mean_error": float((mu - 0.1).abs().max())
                      if has_bias[u.name] else 0.0,
                      "worst_std_error": float((sd - goal_std).abs().max())})
    worst = max(units, key=lambda u: u["worst_mean_error"])
    D.log(f"{net} {draw} batch {batch_size}: worst channel-mean error "
          f"{worst['worst_mean_error']:.3g} ({worst['unit']})")
    return {"net": net, "draw": draw, "batch_size": batch_size, "passes": report.within_passes,
            "notes": report.notes, "units": units}


def markdown(result: dict) -> str:
    lines = ["| net | draw | calibration batches | within passes | units off (channel mean "
             "not within 0.05 of beta, or std not within 0.05 of 1, of --head-std for the "
             "classifier) | worst unit: channel "
             "means (report says) | its std |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        bad = [u for u in r["units"] if u["worst_mean_error"] > 0.05 or
               u["worst_std_error"] > 0.05]
        w = max(r["units"], key=lambda u: u["worst_mean_error"])
        lines.append(
            f"| {r['net']} | {r['draw']} | {128 // r['batch_size']} | {r['passes']} | "
            f"{len(bad)} of {len(r['units'])}"
            + (f" ({', '.join(u['unit'].replace('features.', '') for u in bad[:4])}"
               f"{', ...' if len(bad) > 4 else ''})" if bad else "")
            + f" | {w['unit']}: {w['mean_min']:.3g} .. {w['mean_max']:.3g} "
              f"({w['report_mean']:.3g}) | {w['std_mean']:.3g} ({w['report_std']:.3g}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="vgg11 only")
    ap.add_argument("--results-dir")
    ap.add_argument("--table", metavar="JSON")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    out = D.results_dir(args.results_dir, args.quick) / "within_check.json"
    nets = ["vgg11"] if args.quick else ["vgg11", "resnet18"]
    rows = [check(n, d, b) for n in nets for d in DRAWS for b in (128, 64)]
    result = {"provenance": D.provenance(), "rows": rows}
    D.write_json(result, out)
    print(markdown(result))


if __name__ == "__main__":
    main()

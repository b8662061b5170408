"""Issue 3's figures: change-rate spread of fresh timm models before and after ckptinit,
on the calibration draws and measured independently (other crops, other gradient draws).

    .venv/bin/python benchmarks/rates.py resnet18 resnet50 [--images 64] [--json out.json]
    .venv/bin/python benchmarks/rates.py resnet18 --no-zero-init-last
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from ckptinit.api import measure, rescale
from ckptinit.data import load_calibration
from ckptinit.options import CalibrationOptions, RescaleOptions


def independent_spread(model, images, seed: int, draws: int) -> tuple[float, int]:
    report = measure(model, images, RescaleOptions(grad_batches=draws, seed=seed,
                                                   batch_size=len(images)))
    rates = [u.rate_before for u in report.units if u.rate_before and u.rate_before > 0]
    return max(rates) / min(rates), len(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--check-images", type=int, default=32)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("--no-zero-init-last", action="store_true",
                    help="timm's zero_init_last=False: every residual branch gets gradient")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        kwargs = {"zero_init_last": False} if args.no_zero_init_last else {}
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:  # not a residual net
            kwargs = {}
            model = timm.create_model(name, pretrained=False)
        calib = load_calibration(model, CalibrationOptions(images=args.images, holdout=16))
        # other images: crops drawn with another seed, never seen by the fit
        other = load_calibration(model, CalibrationOptions(images=args.check_images, holdout=0,
                                                           seed=1234)).images
        timm_spread, timm_n = independent_spread(model, other, seed=99, draws=args.draws)
        t = time.perf_counter()
        model, report = rescale(model, calib.images, RescaleOptions(), holdout=calib.holdout)
        elapsed = time.perf_counter() - t
        after, n = independent_spread(model, other, seed=99, draws=args.draws)
        row = dict(model=name, model_args=kwargs, timm_init_spread=timm_spread,
                   timm_units_with_grad=timm_n,
                   calib_spread_before=report.rate_spread("before"),
                   calib_spread_after=report.rate_spread("after"),
                   iterations=report.between_iterations, converged=report.converged,
                   independent_spread_after=after, units_with_grad=n,
                   rescale_seconds_cpu=elapsed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

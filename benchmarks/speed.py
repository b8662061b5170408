"""Cost of ckptinit against one plain forward pass and against the `lsuv` package, measured
side by side in one process (medians of several runs; ratios, since this machine is shared).

    .venv/bin/pip install lsuv==0.3.0   # or: pip install -e ".[bench]"
    .venv/bin/python benchmarks/speed.py --model resnet18 --size 64 --images 32 --runs 5
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import timm
import torch

from ckptinit.api import rescale
from ckptinit.options import RescaleOptions


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--weights", default="gaussian")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    x = torch.randn(args.images, 3, args.size, args.size)

    def fresh():
        torch.manual_seed(0)
        return timm.create_model(args.model, pretrained=False)

    model = fresh()
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    def within():
        rescale(fresh(), x, RescaleOptions(between=False, weights=args.weights))

    def full():
        rescale(fresh(), x, RescaleOptions(weights=args.weights))

    def create():
        fresh()

    forward()  # warm-up
    t_create = timed(create, args.runs)
    t_fwd = timed(forward, args.runs)
    t_within = timed(within, args.runs) - t_create
    t_full = timed(full, args.runs) - t_create
    result = dict(model=args.model, size=args.size, images=args.images, runs=args.runs,
                  weights=args.weights, forward_s=t_fwd, within_s=t_within, full_s=t_full,
                  within_over_forward=t_within / t_fwd, full_over_forward=t_full / t_fwd)
    try:
        import lsuv

        def run_lsuv():
            lsuv.lsuv_with_singlebatch(fresh(), x, verbose=False)

        t_lsuv = timed(run_lsuv, args.runs) - t_create
        result.update(lsuv_s=t_lsuv, lsuv_over_forward=t_lsuv / t_fwd,
                      lsuv_over_within=t_lsuv / t_within)
    except ImportError:
        result["lsuv"] = "not installed"
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The model after the steps, measured on held-out images in eval mode (as the checkpoint
will be used): the output's scale, and every unit's output statistics. The steps never saw
these images, so what they report is not the moments they fitted."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..report import RunReport
from .rates import output_tensors
from .stats import Moments
from .units import Unit, removing
from .within import channel_dim

log = logging.getLogger(__name__)

OUTPUT_STD_RANGE = (0.5, 2.0)  # x --head-std: the output scale carried over to other images


def check_heldout(model: nn.Module, units: list[Unit], holdout: Iterable[torch.Tensor],
                  report: RunReport, head_std: float, drawn: bool) -> None:
    """Fill each unit's `mean_heldout`/`std_heldout` (channel averages, first call) and the
    report's `output_std`; warn when a fresh net's output scale does not carry over."""
    names = {u.module: u.name for u in units}
    moments: dict[str, Moments] = {}
    seen: set[str] = set()

    def hook(module, args, z):
        name = names[module]
        if name not in seen:
            seen.add(name)
            m = Moments.of(z, channel_dim(module))
            moments[name] = moments[name] + m if name in moments else m

    was = {m: m.training for m in model.modules()}
    model.eval()
    ys = []
    try:
        with torch.no_grad(), removing([u.module.register_forward_hook(hook) for u in units]):
            for x in holdout:
                seen.clear()
                ys.append(torch.cat([t.detach().flatten(1).double()
                                     for t in output_tensors(model(x))], 1))
    finally:
        for m, t in was.items():
            m.train(t)
    records = {r.name: r for r in report.units}
    for name, m in moments.items():
        if name in records:
            records[name].mean_heldout = float(m.mean.mean())
            records[name].std_heldout = float(m.std.mean())
    y = torch.cat(ys)
    report.output_std = float(y.std()) if y.numel() > 1 else None
    lo, hi = (head_std * r for r in OUTPUT_STD_RANGE)
    if drawn and report.output_std is not None and not lo <= report.output_std <= hi:
        msg = (f"the model's output std on {y.shape[0]} held-out images (eval mode) is "
               f"{report.output_std:.3g}, outside [{lo:g}, {hi:g}] (0.5 to 2 x --head-std): the "
               "statistics fitted on "
               "the calibration images do not carry over to other images; more, and more "
               "varied, calibration images (--images, --data) usually fix it")
        log.warning(msg[0].upper() + msg[1:] + ".")
        report.notes.append("output scale: " + msg)

"""The model after the steps, measured on held-out images in eval mode (as the checkpoint
will be used): the output's scale, and every unit's output statistics. The steps never saw
these images, so what they report is not the moments they fitted."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from ..distributed import all_reduce_sum_
from ..report import RunReport
from .rates import output_tensors
from .units import Unit
from .within import measure_outputs

log = logging.getLogger(__name__)

OUTPUT_STD_RANGE = (0.5, 2.0)  # x --head-std: the output scale carried over to other images


def check_heldout(model: nn.Module, units: list[Unit], holdout: Iterable[torch.Tensor],
                  report: RunReport, head_std: float, drawn: bool) -> None:
    """Fill each unit's `mean_heldout`/`std_heldout` (channel averages, first call) and the
    report's `output_std`; warn when a fresh net's output scale does not carry over."""
    acc: list[torch.Tensor] = []  # images, values, sum, sum of squares of every output

    def add(y) -> None:
        v = torch.cat([t.detach().flatten(1).double() for t in output_tensors(y)], 1)
        acc.append(torch.stack([v.new_tensor(v.shape[0]), v.new_tensor(v.numel()), v.sum(),
                                (v * v).sum()]))

    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        moments = measure_outputs(model, units, holdout, on_output=add)
    finally:
        for m, t in was.items():
            m.train(t)
    records = {r.name: r for r in report.units}
    for name, m in moments.items():
        if name in records:
            records[name].mean_heldout = float(m.mean.mean())
            records[name].std_heldout = float(m.std.mean())
    total = torch.stack(acc).sum(0) if acc else torch.zeros(  # a rank with no batch
        4, dtype=torch.float64, device=next(model.parameters()).device)
    all_reduce_sum_([total])  # under torchrun every rank ran its share of the batches
    images, n, s1, s2 = total.tolist()
    report.output_std = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else None
    lo, hi = (head_std * r for r in OUTPUT_STD_RANGE)
    if drawn and report.output_std is not None and not lo <= report.output_std <= hi:
        msg = (f"the model's output std on {int(images)} held-out images (eval mode) is "
               f"{report.output_std:.3g}, outside [{lo:g}, {hi:g}] (0.5 to 2 x --head-std): the "
               "statistics fitted on "
               "the calibration images do not carry over to other images; more, and more "
               "varied, calibration images (--images, --data) usually fix it")
        log.warning(msg[0].upper() + msg[1:] + ".")
        report.notes.append("output scale: " + msg)

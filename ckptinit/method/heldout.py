"""The model after the steps, measured on held-out images in eval mode (as the checkpoint
will be used): the output's scale, how strongly it follows the images' contrast, and every
unit's output statistics; and the change rates once more, on those images with other
gradient draws. The steps never saw these images, so what they report is not the moments
or the rates they fitted."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from ..distributed import all_reduce_sum_, shard
from ..report import RunReport, UnitRecord
from .rates import estimate_rates, output_tensors
from .units import Unit
from .within import measure_outputs

log = logging.getLogger(__name__)

OUTPUT_STD_RANGE = (0.5, 2.0)  # x --head-std: the output scale carried over to other images
# the held-out images at 0.9 and 1.1 x their contrast (of the normalised input): the output
# std's exponent is 1 for a scale-equivariant net, 0 behind a final norm; 0.7-2.0 for
# timm's init of ResNet, VGG, EfficientNet and MobileNetV3 (benchmarks/README.md)
CONTRAST = (0.9, 1.1)
CONTRAST_GAIN_LIMIT = 3.0  # above: eval mode amplifies any change of image statistics


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
    report.output_std = _std(n, s1, s2)
    report.output_contrast_gain = _contrast_gain(model, holdout)
    gain = report.output_contrast_gain
    if drawn and gain is not None and gain > CONTRAST_GAIN_LIMIT:
        msg = (f"in eval mode the model's output std follows the images' contrast to the "
               f"power {gain:.2g} (held-out images at {CONTRAST[0]:g} and {CONTRAST[1]:g} x "
               "their contrast; a scale-equivariant net has 1): images less like the "
               "calibration ones get a much larger or smaller output scale. Training on "
               "BatchNorm batch statistics takes most of it away; for eval-mode use, "
               "calibrate on images like those it will see (--data)")
        log.warning(msg[0].upper() + msg[1:] + ".")
        report.notes.append("contrast gain: " + msg)
    lo, hi = (head_std * r for r in OUTPUT_STD_RANGE)
    if drawn and report.output_std is not None and not lo <= report.output_std <= hi:
        msg = (f"the model's output std on {int(images)} held-out images (eval mode) is "
               f"{report.output_std:.3g}, outside [{lo:g}, {hi:g}] (0.5 to 2 x --head-std): the "
               "statistics fitted on "
               "the calibration images do not carry over to other images; more, and more "
               "varied, calibration images (--images, --data) usually fix it")
        log.warning(msg[0].upper() + msg[1:] + ".")
        report.notes.append("output scale: " + msg)


def measure_heldout_rates(model: nn.Module, units: list[Unit], holdout,
                          records: list[UnitRecord], draws: int, seed: int,
                          slices: dict[str, int]) -> None:
    """Fill each unit's (and slice's) `rate_heldout`: the change rate after the step on the
    held-out images, with another seed's gradient draws (`RunReport.rate_spread_heldout`)."""
    rates = estimate_rates(model, units, holdout, draws, seed + 1, slices)
    for rec in records:
        if rec.name in rates.grad_sq:
            rec.rate_heldout = rates.rate(rec.name)
            for part, rate in zip(rec.slices or [], rates.slice_rates(rec.name)):
                part["rate_heldout"] = rate if math.isfinite(rate) else None


def _std(n: float, s1: float, s2: float) -> float | None:
    return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else None


@torch.no_grad()
def _contrast_gain(model: nn.Module, holdout: Iterable[torch.Tensor]) -> float | None:
    """d log std(f(c x)) / d log c at c = 1, from the output std at the two CONTRAST
    factors, eval mode (sums reduced over the ranks, as above)."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        parts = []
        for _, x in shard(holdout):  # this rank's batches
            row = []
            for c in CONTRAST:
                v = torch.cat([t.flatten(1).double() for t in output_tensors(model(x * c))], 1)
                row.append(torch.stack([v.new_tensor(v.numel()), v.sum(), (v * v).sum()]))
            parts.append(torch.cat(row))
    finally:
        for m, t in was.items():
            m.train(t)
    device = next(model.parameters()).device
    total = torch.stack(parts).sum(0) if parts else torch.zeros(6, dtype=torch.float64,
                                                                device=device)
    all_reduce_sum_([total])
    lo, hi = _std(*total[:3].tolist()), _std(*total[3:].tolist())
    if not lo or not hi:
        return None
    return math.log(hi / lo) / math.log(CONTRAST[1] / CONTRAST[0])

"""The model output's scale after the steps, measured on held-out images in eval mode."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..report import RunReport
from .rates import output_tensors

log = logging.getLogger(__name__)

OUTPUT_STD_RANGE = (0.5, 2.0)  # x --head-std: the output scale carried over to other images


def check_output_scale(model: nn.Module, holdout: Iterable[torch.Tensor], report: RunReport,
                       head_std: float, drawn: bool) -> None:
    """The model output's std on the held-out images in eval mode (running BatchNorm
    statistics, as the checkpoint will be used): measured outside the steps, on images they
    never fitted, so a scale that does not carry over is said, not hidden."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ys = [torch.cat([t.detach().flatten(1).double() for t in output_tensors(model(x))],
                            1) for x in holdout]
    finally:
        for m, t in was.items():
            m.train(t)
    y = torch.cat(ys)
    report.output_std = float(y.std()) if y.numel() > 1 else None
    lo, hi = (head_std * r for r in OUTPUT_STD_RANGE)
    if drawn and report.output_std is not None and not lo <= report.output_std <= hi:
        msg = (f"the model's output std on {y.shape[0]} held-out images (eval mode) is "
               f"{report.output_std:.3g}, outside [{lo:g}, {hi:g}]: the statistics fitted on "
               "the calibration images do not carry over to other images; more, and more "
               "varied, calibration images (--images, --data) usually fix it")
        log.warning(msg[0].upper() + msg[1:] + ".")
        report.notes.append("output scale: " + msg)

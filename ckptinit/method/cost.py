"""What a run would cost: passes through the model and peak memory, for `--dry-run`.

The passes follow the stages of `api.rescale` one by one, with the caps of each loop
(within.MAX_PASSES, --iters): a stage that stops once converged is counted at its cap and
marked as a bound. The memory comes from one small forward and backward pass at the real
input size (`measure_footprint`): every tensor the forward produces and what autograd keeps
for the backward, per image, scaled to the batch size. Nothing here changes the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..options import RescaleOptions
from ..report import PassEstimate
from .rates import output_tensors
from .units import Unit, calibration_mode, removing
from .within import MAX_PASSES

SCAN_IMAGES = 2  # what api.rescale probes with: scan_units and the residual-branch search
TRACE_IMAGES = 4  # and the scale trace of plan_moves
TRACE_PASSES = 2  # plan_moves: find_fused_slices, then trace_scales


@dataclass
class Footprint:
    """Bytes per image of one forward pass (with autograd on, as the change rates run it),
    and what each unit's input offers a patch draw."""

    produced: float  # every tensor the forward creates (views and in-place ops not again)
    saved: float  # what autograd keeps for the backward (parameters not counted)
    largest: float  # the largest single tensor
    input: float  # the image itself
    rows: dict[str, int] = field(default_factory=dict)  # unit -> input rows (positions) per image
    zero_grad: set[str] = field(default_factory=set)  # units whose weight got no gradient


class _Produced(TorchDispatchMode):
    """Sums the bytes of every new tensor an op returns (outputs that alias an input, as
    views and in-place ops do, are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = getattr(getattr(func, "_schema", None), "returns", [])
        aliased = [r.alias_info is not None for r in returns] or [False]
        outs = out if isinstance(out, (tuple, list)) else [out]
        for i, t in enumerate(outs):  # one return may be a list (split, unbind)
            if isinstance(t, torch.Tensor) and not aliased[min(i, len(aliased) - 1)]:
                n = t.numel() * t.element_size()
                self.total += n
                self.largest = max(self.largest, n)
        return out


def measure_footprint(model: nn.Module, units: list[Unit], sample: torch.Tensor,
                      seed: int = 0) -> Footprint:
    """One forward and backward of `sample` in calibration mode under the change rates'
    random linear loss; the model's weights, statistics and grad flags are left as found."""
    n = sample.shape[0]
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    rows: dict[str, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    def hook_for(name: str, linear: bool):
        def hook(module, args, z):
            if name not in rows:
                rows[name] = (args[0].numel() // max(1, args[0].shape[-1]) // n if linear
                              else z[0, 0].numel())
        return hook

    weights = [u.module.weight for u in units]
    requires = [w.requires_grad for w in weights]
    handles = [u.module.register_forward_hook(hook_for(u.name, isinstance(u.module, nn.Linear)))
               for u in units]
    mode = _Produced()
    try:
        with removing(handles), calibration_mode(model):
            for w in weights:
                w.requires_grad_(True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
                ys = output_tensors(model(sample))
            gen = torch.Generator(device=sample.device).manual_seed(seed * 1000003)
            loss = sum(((torch.randint(0, 2, y.shape, generator=gen, device=y.device)
                         .to(y.dtype) * 2 - 1) * y).sum() for y in ys)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for w, r in zip(weights, requires):
            w.requires_grad_(r)
    zero = {u.name for u, g in zip(units, grads) if g is None or not bool(g.detach().any())}
    return Footprint(produced=mode.total / n, saved=sum(saved.values()) / n,
                     largest=mode.largest / n, input=sample[0].numel() * sample.element_size(),
                     rows=rows, zero_grad=zero)


def estimate_passes(options: RescaleOptions, *, images: int, holdout: int, within: bool,
                    share_branches: bool, renormalise: bool, approximate: bool,
                    traces: int = TRACE_PASSES) -> list[PassEstimate]:
    """The calls of the model's forward (and backward) a run would make, stage by stage, in
    the order of `api.rescale`. `renormalise`: relaxed pairs whose second unit each
    iteration re-normalises; `approximate`: moves that change the function (BatchNorm is
    then re-estimated); `traces`: the passes of plan_moves (counted by the dry run: with
    --allow-function-change and pinned units it traces twice)."""
    bs = options.batch_size
    nb = math.ceil(images / bs)
    b = min(bs, images)
    nh, bh = (math.ceil(holdout / bs), min(bs, holdout)) if holdout else (nb, b)
    within_passes = 1 if nb == 1 else MAX_PASSES
    out = [PassEstimate("scan units", 1, images=SCAN_IMAGES)]
    if share_branches:
        out.append(PassEstimate("find zero-started residual branches", 1, images=SCAN_IMAGES))
    if within:
        out.append(PassEstimate(
            "within-layer", within_passes * nb, images=b, bound=nb > 1,
            note=f"{nb} batch(es) per pass" + (f", at most {MAX_PASSES} passes (stops when no "
                                               f"channel moves by more than --tol)"
                                               if nb > 1 else ", one exact pass")))
    n_scale = nh if holdout else 1
    where = dict(images=bh if holdout else min(16, b),
                 note="held-out images" if holdout else "the first calibration images")
    scale = [PassEstimate("output scale (eval mode)", n_scale, **where),
             PassEstimate("contrast gain (eval mode)", 2 * n_scale,
                          **dict(where, note=where["note"] + " at 0.9 and 1.1 x contrast"))]
    if not options.between:
        return out + scale
    out.append(PassEstimate("trace the data flow", traces, images=TRACE_IMAGES))
    out.append(PassEstimate("function check (before), float64", nh, images=bh,
                            note="held-out images" if holdout else "calibration images"))
    g, iters = options.grad_batches, options.iters
    adam = options.optimizer == "adam"
    out.append(PassEstimate("change rates", g, g, images=b, note="--grad-batches draws"))
    if iters:
        rates = 0 if adam else g * iters
        if rates:
            out.append(PassEstimate("change rates, each iteration", rates, rates, images=b,
                                    bound=True, note=f"at most --iters {iters}; stops when "
                                    "every rate is within --tol"))
        if renormalise:
            per = (1 + within_passes) * nb
            out.append(PassEstimate("re-normalise relaxed pairs", per * iters, images=b,
                                    bound=True, note="an iteration that moves them"))
    if approximate:
        out.append(PassEstimate("re-estimate BatchNorm", nb, images=b, bound=True,
                                note="after moves that change the function"))
    out.append(PassEstimate("function check (after), float64", nh, images=bh))
    if holdout and not adam:
        out.append(PassEstimate("change rates on the held-out images", g, g, images=bh,
                                note="--grad-batches draws, another seed"))
    return out + scale


def estimate_memory(model: nn.Module, units: list[Unit], fp: Footprint,
                    options: RescaleOptions, *, images: int, holdout: int,
                    patch_bytes: int = 0) -> dict:
    """Peak tensor memory of a run on its device, by component, in bytes: an estimate that
    holds every activation of a forward at once (a pass without grad frees most as it goes;
    one with grad keeps about that much for its backward)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    model_bytes = params + buffers
    b = min(options.batch_size, images)
    bh = min(options.batch_size, holdout) if holdout else b
    batches_in = 2 * b * fp.input  # a batch in use and one prefetched
    held = holdout * fp.input
    phases = {
        "within-layer pass (no grad)": model_bytes + b * fp.produced + patch_bytes,
        "change rates (forward + backward)": model_bytes + sum(
            u.module.weight.numel() * u.module.weight.element_size() for u in units)
        + b * (fp.produced + 2 * fp.largest),
        "function check (float64 copy)": 3 * model_bytes + 2 * bh * fp.produced,
    }
    if not options.between:
        phases = {k: v for k, v in phases.items() if k.startswith("within")}
    phase = max(phases, key=phases.get)
    return {
        "peak_bytes": int(phases[phase] + batches_in + held),
        "peak_phase": phase,
        "phases": {k: int(v + batches_in + held) for k, v in phases.items()},
        "parameter_bytes": params,
        "buffer_bytes": buffers,
        "per_image": {"produced": int(fp.produced), "saved_for_backward": int(fp.saved),
                      "largest": int(fp.largest), "input": int(fp.input)},
        "batch_images": b,
        "how": ("parameters and buffers, plus every tensor one forward produces (measured per "
                "image on a small pass at the real input size, times the batch), plus the unit "
                "weights' gradients and two of the largest activation for the backward; the "
                "function check holds a float64 copy of the model; batches in flight and the "
                "held-out images count too. Tensors only: the process adds the Python and "
                "torch runtime (about 1 GB of host memory with timm) and image decoding."),
    }

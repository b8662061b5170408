"""A checkpoint's tensors into the model: the best reading of its keys (keys.py), timm's
resizing filter for the rest, a refusal for poor fits, and an account of what was loaded."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._helpers import one_line
from ..errors import SourceError
from ..options import SourceOptions
from .keys import KNOWN_PREFIXES, Match, best_prefix, candidate_dicts, is_ema, rename_key
from .loaded import LoadedModel
from .pretrained import classifier_keys, classifier_names

log = logging.getLogger(__name__)

MIN_MATCH_FRACTION = 0.5  # of the model's parameters (classifier excluded) that must load
MAX_MISMATCH_FRACTION = 0.1  # of them that may have a same-name tensor of another shape,
MAX_MISMATCHES = 2  # or this many (a changed in_chans or pos_embed size)


def load_state_into(lm: LoadedModel, obj: Any, options: SourceOptions) -> None:
    """Unwrap, match by name and shape, refuse poor matches, then load with dtype casts."""
    model_sd = lm.model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in model_sd.items()}
    candidates = candidate_dicts(obj, options.use_ema)
    if not candidates:
        raise SourceError(
            f"No tensors found in {Path(lm.path or lm.source).name}: is it a model checkpoint?"
        )
    best: Match | None = None
    for rank, (nested, tensors) in enumerate(candidates):
        m = best_prefix(nested, tensors, shapes, options, rank)
        if best is None or (len(m.loaded), -m.rank) > (len(best.loaded), -best.rank):
            best = m
    assert best is not None
    adapted = _adapt_with_timm_filter(lm.model, best, model_sd)
    _check_match(lm, best, model_sd, adapted)

    lm.nested_key = best.nested
    lm.stripped_prefixes = best.prefixes
    with_ema = best.nested is not None and any(is_ema(p) for p in best.nested.split("/"))
    if options.use_ema and not with_ema:
        lm.notes.append("no EMA weights in the checkpoint; loaded the regular ones")
    elif with_ema and not options.use_ema:
        lm.notes.append(f"loaded the EMA weights '{best.nested}': they fit the model best")
    if best.tie and best.prefixes[0] in KNOWN_PREFIXES:
        log.info(
            "Prefixes %s and %s match equally well; used %s",
            best.prefixes[0],
            best.tie,
            best.prefixes[0],
        )
    elif best.tie:
        lm.notes.append(
            f"prefixes '{best.prefixes[0]}' and '{best.tie}' match equally well; used the "
            "first (choose with --strip-prefix)"
        )
    converted = dict(adapted)  # adapted by timm: loaded, but not the stored bytes
    for mk, ck in best.loaded.items():
        t = best.tensors[ck]
        lm.original_tensors[mk] = t
        converted[mk] = t.to(dtype=model_sd[mk].dtype)
    result = lm.model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:  # cannot happen: every key came from the model's state_dict
        raise SourceError(f"Internal: unexpected keys {result.unexpected_keys[:3]} while loading")
    lm.loaded_keys = set(converted)
    lm.missing_keys = [k for k in model_sd if k not in lm.loaded_keys]
    used = set(best.loaded.values()) | {best.mismatched[k] for k in adapted}
    lm.dropped_keys = [k for k in best.tensors if k not in used]
    lm.shape_mismatches = {
        mk: (tuple(best.tensors[ck].shape), shapes[mk])
        for mk, ck in best.mismatched.items()
        if mk not in adapted
    }
    if adapted:
        lm.notes.append(
            f"{len(adapted)} tensors resized to the model by timm's checkpoint filter: "
            + ", ".join(sorted(adapted)[:5])
        )
    head = classifier_keys(lm.model, model_sd)
    for mk, (a, b) in lm.shape_mismatches.items():
        if mk in head and mk.endswith(".weight") and len(a) == len(b) and a[1:] == b[1:]:
            lm.notes.append(
                f"checkpoint classifier {mk} has {a[0]} outputs, the model {b[0]}: it gets a "
                f"fresh init (pass --num-classes {a[0]} to keep it)"
            )
    extra = _unexplained(best, options.key_map, lm.model, model_sd)
    if extra:
        extra.sort(key=lambda k: not k.endswith(".weight"))
        lm.notes.append(
            f"{len(extra)} checkpoint tensors look like parts of the model but do not exist in "
            f"{lm.architecture} (e.g. {extra[0]}): check --arch"
        )
    dtypes = Counter(str(best.tensors[ck].dtype).replace("torch.", "") for ck in used)
    log.info(
        "Loaded %d of %d model tensors from %s%s%s (%s); %d missing, %d dropped",
        len(lm.loaded_keys), len(model_sd), lm.path,
        f" [{best.nested}]" if best.nested else "",
        f" stripping {','.join(best.prefixes)}" if best.prefixes else "",
        ", ".join(f"{k}: {v}" for k, v in dtypes.items()),
        len(lm.missing_keys), len(lm.dropped_keys),
    )  # fmt: skip


def _adapt_with_timm_filter(
    model: nn.Module, m: Match, model_sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Same-name tensors of another shape that timm's own filter can resize to the model.

    timm's `checkpoint_filter_fn` (next to the model class) resamples position embeddings
    and patch embeddings for another image or patch size. Only the mismatched tensors are
    taken from its output, so everything else stays exactly as stored.
    """
    if not m.mismatched:
        return {}

    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if not callable(fn):
        return {}
    sd = {mk: m.tensors[ck] for mk, ck in (m.loaded | m.mismatched).items()}
    sd = {k: v.to(model_sd[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    try:
        out = fn(sd, model)
    except Exception as e:  # noqa: BLE001 - filters assume timm's layouts; best effort
        log.debug("timm checkpoint filter failed (%s); mismatched tensors dropped", one_line(e))
        return {}
    adapted = {}
    for mk in m.mismatched:
        t = out.get(mk) if isinstance(out, Mapping) else None
        target = model_sd[mk]
        if isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(target.shape):
            adapted[mk] = t.to(target.dtype).contiguous()
    return adapted


def _check_match(
    lm: LoadedModel,
    m: Match,
    model_sd: Mapping[str, torch.Tensor],
    adapted: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse a checkpoint that fits the architecture poorly: the wrong --arch, most likely.

    Name+shape matches alone are fooled by sibling architectures (resnet50 weights give
    resnet18 most of its BatchNorm and 3x3 convs), so many same-name tensors with other
    shapes also count as a poor fit.
    """
    head = classifier_keys(lm.model, model_sd)
    params = [n for n, _ in lm.model.named_parameters() if n not in head]
    if not params:
        params = [n for n, _ in lm.model.named_parameters()]
    adapted = adapted or {}
    matched = sum(1 for n in params if n in m.loaded or n in adapted)
    mism = [n for n in params if n in m.mismatched and n not in adapted]
    max_mism = max(MAX_MISMATCHES, MAX_MISMATCH_FRACTION * len(params))
    if params and matched >= MIN_MATCH_FRACTION * len(params) and len(mism) <= max_mism:
        return
    name = Path(lm.path or lm.source).name
    examples = [
        f"{mk}: checkpoint {tuple(m.tensors[m.mismatched[mk]].shape)} "
        f"vs model {tuple(model_sd[mk].shape)}"
        for mk in mism[:2]
    ]
    if examples:
        detail = f", {len(mism)} have other shapes, e.g. " + "; ".join(examples)
    else:
        ck = ", ".join(list(m.tensors)[:2])
        mk = ", ".join(params[:2])
        detail = f"; checkpoint keys look like {ck}, model keys like {mk} (see --strip-prefix)"
    where = f" [{m.nested}]" if m.nested else ""
    raise SourceError(
        f"{name}{where} does not fit {lm.architecture}: {matched} of its {len(params)} "
        f"weight tensors matched by name and shape{detail}; check --arch."
    )


def _unexplained(
    m: Match, key_map: Mapping[str, str], model: nn.Module, model_sd: Mapping[str, Any]
) -> list[str]:
    """Dropped tensors that look like parts of the model (a deeper sibling architecture?).

    Heads (the classifier's top module, and common projection-head names) are expected to
    differ between pre-training and the model, so they do not count.
    """
    tops = {k.split(".", 1)[0] for k in model_sd}
    heads = {n.split(".", 1)[0] for n in classifier_names(model)}
    heads |= {"fc", "head", "heads", "classifier", "last_linear", "projector", "predictor"}
    used = set(m.loaded.values())
    out = []
    for k in m.tensors:
        if k in used or (m.prefixes and not k.startswith(tuple(m.prefixes))):
            continue
        nk = rename_key(k, m.prefixes, key_map)
        top = nk.split(".", 1)[0]
        if nk not in model_sd and top in tops and top not in heads:
            out.append(k)
    return out

"""Reading a checkpoint's keys: nested state dicts, key prefixes, renames, name+shape matches.

Pure functions of dicts (tensors in, key mappings out), testable without a model: the
model enters only as its state-dict shapes. state.py applies the best reading to a model.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..options import SourceOptions

# Nested dicts that hold a state dict, in order of preference (EMA ones only with use_ema).
NESTED_KEYS = ("state_dict", "model", "teacher", "student", "module", "net", "network")
EMA_KEYS = ("model_ema", "state_dict_ema")
# Prefixes tried first; others are discovered from the keys themselves.
KNOWN_PREFIXES = (
    "module.",
    "_orig_mod.",
    "module._orig_mod.",
    "_orig_mod.module.",
    "backbone.",
    "module.backbone.",
    "encoder.",
    "encoder_q.",
    "module.encoder_q.",
    "module.encoder.",
    "base_encoder.",
    "module.base_encoder.",
    "momentum_encoder.",
    "student.backbone.",
    "teacher.backbone.",
    "model.",
    "model.backbone.",
    "net.",
    "network.",
    "trunk.",
    "visual.trunk.",
)


@dataclass
class Match:
    """One way of reading a checkpoint dict into the model."""

    nested: str | None
    prefixes: list[str]
    tensors: dict[str, torch.Tensor]  # as stored, all tensor entries of the nested dict
    loaded: dict[str, str]  # model key -> checkpoint key
    mismatched: dict[str, str]  # model key -> checkpoint key (same name, other shape)
    rank: int
    tie: str | None = None  # another prefix that matched equally well


def candidate_dicts(obj: Any, use_ema: bool) -> list[tuple[str | None, dict[str, torch.Tensor]]]:
    """State-dict-like dicts inside a checkpoint, most preferred first."""
    found: list[tuple[int, int, str | None, dict[str, torch.Tensor]]] = []
    order = 0

    def visit(node: Any, path: str | None, depth: int) -> None:
        nonlocal order
        if isinstance(node, nn.Module):
            node = node.state_dict()
        elif not isinstance(node, Mapping) and callable(getattr(node, "state_dict", None)):
            try:
                node = node.state_dict()
            except Exception:  # noqa: BLE001 - an object that is not a model
                return
        if not isinstance(node, Mapping):
            return
        tensors = {
            k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
        }
        if tensors:
            found.append((_nest_rank(path, use_ema), order, path, tensors))
            order += 1
        if depth >= 3:
            return
        for k, v in node.items():
            if isinstance(k, str) and not isinstance(v, torch.Tensor):
                visit(v, f"{path}/{k}" if path else k, depth + 1)

    visit(obj, None, 0)
    found.sort(key=lambda x: (x[0], x[1]))
    return [(path, tensors) for _, _, path, tensors in found]


def _nest_rank(path: str | None, use_ema: bool) -> int:
    """Preference of a nested dict: EMA first only with use_ema; known wrappers before others."""
    if path is None:
        return 1 if use_ema else 0
    parts = path.split("/")
    if any(is_ema(p) for p in parts):
        return 0 if use_ema else 2 + len(NESTED_KEYS)
    if all(p in NESTED_KEYS for p in parts):
        return 1 + NESTED_KEYS.index(parts[0])
    return 3 + len(NESTED_KEYS)


def is_ema(key: str) -> bool:
    """model_ema, state_dict_ema, ema, ema_model... (EMA_KEYS and their relatives)."""
    return key in EMA_KEYS or "ema" in key.lower().split("_")


def best_prefix(
    nested: str | None,
    tensors: dict[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    options: SourceOptions,
    rank: int,
) -> Match:
    """The prefix (or the user's prefixes) that loads the most tensors by name and shape."""
    if options.strip_prefix:
        loaded, mism = _match_keys(tensors, shapes, list(options.strip_prefix), options.key_map)
        return Match(nested, list(options.strip_prefix), tensors, loaded, mism, rank)
    best: Match | None = None
    for prefix in _prefix_candidates(tensors, shapes, options.key_map):
        strip = [prefix] if prefix else []
        loaded, mism = _match_keys(tensors, shapes, strip, options.key_map)
        if best is None or len(loaded) > len(best.loaded):
            best = Match(nested, strip, tensors, loaded, mism, rank)
        elif len(loaded) == len(best.loaded) and loaded and best.tie is None and best.prefixes:
            if set(loaded) == set(best.loaded) and prefix:
                best.tie = prefix
    assert best is not None
    return best


def _prefix_candidates(
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    key_map: Mapping[str, str],
) -> list[str]:
    """No prefix, the known ones, then prefixes discovered from the keys, most frequent first."""
    found: Counter[str] = Counter()
    first: dict[str, int] = {}
    for i, k in enumerate(tensors):
        for j, ch in enumerate(k):
            if ch == "." and _apply_key_map(k[j + 1 :], key_map) in shapes:
                found[k[: j + 1]] += 1
                first.setdefault(k[: j + 1], i)
    common = common_dotted_prefix(tensors)
    if common:
        found[common] += 0
        first.setdefault(common, len(tensors))
    known = [p for p in KNOWN_PREFIXES if any(k.startswith(p) for k in tensors)]
    discovered = sorted((p for p in found if p not in known), key=lambda p: (-found[p], first[p]))
    return ["", *known, *discovered]


def _match_keys(
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    strip: list[str],
    key_map: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str]]:
    """Model key -> checkpoint key for name+shape matches, and for same-name shape mismatches."""
    loaded: dict[str, str] = {}
    mism: dict[str, str] = {}
    for k, t in tensors.items():
        nk = rename_key(k, strip, key_map)
        if nk not in shapes or nk in loaded:
            continue
        if tuple(t.shape) == shapes[nk]:
            loaded[nk] = k
            mism.pop(nk, None)
        else:
            mism.setdefault(nk, k)
    return loaded, mism


def rename_key(key: str, strip: list[str], key_map: Mapping[str, str]) -> str:
    """Strip the longest matching prefix, then apply the key map."""
    for p in sorted(strip, key=len, reverse=True):
        if key.startswith(p):
            key = key[len(p) :]
            break
    return _apply_key_map(key, key_map)


def _apply_key_map(key: str, key_map: Mapping[str, str]) -> str:
    """Rename the longest matching OLD prefix to NEW (an empty OLD adds a prefix)."""
    if not key_map:
        return key
    for old in sorted(key_map, key=len, reverse=True):
        if key.startswith(old):
            return key_map[old] + key[len(old) :]
    return key


def common_dotted_prefix(keys: Iterable[str]) -> str:
    keys = list(keys)
    if not keys:
        return ""
    common = os.path.commonprefix(keys)
    cut = common.rfind(".")
    return common[: cut + 1] if cut >= 0 else ""

"""timm models: architectures by name (fresh weights), and `hf-hub:` / `local-dir:` sources
loaded by timm's own loaders, with what was loaded accounted for as stored."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._helpers import one_line
from ..errors import SourceError, UsageError
from ..options import SourceOptions
from .loaded import LoadedModel

log = logging.getLogger(__name__)

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
LOCAL_DIR_PREFIX = "local-dir:"
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's Hub order

def create_architecture(
    name: str, options: SourceOptions, pretrained_cfg: dict | None = None
) -> nn.Module:
    """Build a timm architecture with fresh weights; unknown names get close suggestions.

    `pretrained_cfg` (from a config.json) keeps the checkpoint's preprocessing on the model.
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `timm.list_models()`."
        raise SourceError(f"Unknown architecture '{name}'.{hint}")
    kwargs = dict(options.model_args)
    if options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes
    overlay = _pretrained_cfg_overlay(pretrained_cfg)
    try:
        return timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as e:  # an argument the architecture does not take: --model-arg
        raise UsageError(f"Cannot build '{name}' with {kwargs}: {one_line(e)}; check "
                         "--model-arg.") from e


def _pretrained_cfg_overlay(pretrained_cfg: Mapping[str, Any] | None) -> dict | None:
    """The fields of a config.json's pretrained_cfg that timm knows, minus weight locations."""
    if not pretrained_cfg:
        return None
    from timm.models._pretrained import PretrainedCfg

    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    skip = {"file", "url", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "custom_load"}
    return {k: v for k, v in pretrained_cfg.items() if k in known and k not in skip} or None


def load_pretrained(source: str, options: SourceOptions) -> LoadedModel:
    """hf-hub: and local-dir: go through timm so that its filters and head adaptation apply.

    A Hub repository is first fetched into the Hugging Face cache with `options.token`
    (timm's own Hub loader takes no token), then loaded by timm from that snapshot.
    """
    import timm

    is_hub = source.startswith(HUB_PREFIXES)
    ident = source.split(":", 1)[1]
    if not ident:
        raise SourceError(f"'{source}' names no repository or folder after the prefix.")
    repo_id, rev = (ident.split("@", 1) + [None])[:2] if is_hub else (None, None)
    local_path = None if is_hub else Path(ident).expanduser()
    if local_path is not None and not (local_path / "config.json").is_file():
        what = "folder" if local_path.is_dir() else "path"
        raise SourceError(
            f"local-dir: {what} '{local_path}' has no config.json; use a folder written by timm "
            "or ckptinit, or pass the weights file itself with --arch."
        )
    kwargs = dict(options.model_args)
    if options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes
    try:
        if is_hub:
            local_path = fetch_hub_snapshot(repo_id, rev, options.token)
        model = timm.create_model(f"{LOCAL_DIR_PREFIX}{local_path}", pretrained=True, **kwargs)
        raw = _timm_raw_state_dict(local_path)
    except SourceError:
        raise
    except Exception as e:
        raise _timm_error(source, repo_id, e) from e

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    arch = cfg.get("architecture") or type(model).__name__
    lm = LoadedModel(
        model=model,
        architecture=arch,
        source=source,
        pretrained=True,
        kind="hf-hub" if is_hub else "local-dir",
        path=None if is_hub else str(local_path),
        repo_id=repo_id,
        revision=model_revision(local_path, rev) if is_hub else None,
        arch_from="config.json",
        model_args=_model_args_of(model, options),
        num_classes=model_num_classes(model, options.num_classes),
    )
    _account_timm_load(lm, raw, cfg)
    log.info(
        "Loaded %s (%s): %d tensors loaded, %d missing",
        source, arch, len(lm.loaded_keys), len(lm.missing_keys),
    )  # fmt: skip
    return lm


def fetch_hub_snapshot(repo_id: str, revision: str | None, token: str | None) -> Path:
    """config.json and the weights timm would pick, fetched with `token` into the Hugging
    Face cache; returns the snapshot folder (what timm then loads as local-dir:)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    config = Path(hf_hub_download(repo_id, "config.json", revision=revision, token=token))
    cfg = json.loads(config.read_text())
    pretrained_cfg = cfg.get("pretrained_cfg", cfg) if isinstance(cfg, dict) else {}
    named = pretrained_cfg.get("hf_hub_filename")
    names = [named] if named else list(HUB_WEIGHT_FILES)
    for i, name in enumerate(names):
        try:
            hf_hub_download(repo_id, name, revision=revision, token=token)
            break
        except EntryNotFoundError:
            if i == len(names) - 1:
                raise
    return config.parent


def _timm_raw_state_dict(local_path: Path) -> dict[str, torch.Tensor]:
    """The weights timm just loaded, re-read as stored to keep their original dtype."""
    import timm.models

    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
        if (local_path / name).is_file():
            return timm.models.load_state_dict(str(local_path / name))
    for ext in (".safetensors", ".pth", ".pth.tar", ".bin"):
        files = sorted(local_path.glob(f"*{ext}"))
        if files:
            return timm.models.load_state_dict(str(files[0]))
    return {}


def _account_timm_load(lm: LoadedModel, raw: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Fill loaded/missing/dropped/original_tensors with timm's loading rules.

    timm loads strictly, except that it discards the classifier when num_classes differs
    from the checkpoint's; tensors its checkpoint filter transformed count as loaded but are
    not kept as originals (they are not the stored bytes).
    """
    model_sd = lm.model.state_dict()
    head = classifier_keys(lm.model, model_sd)
    head_reset = cfg.get("num_classes") is not None and lm.num_classes != cfg.get("num_classes")
    transformed = 0
    for k, v in model_sd.items():
        if head_reset and k in head:
            lm.missing_keys.append(k)
            continue
        lm.loaded_keys.add(k)
        t = raw.get(k)
        if isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(v.shape):
            if torch.equal(t.to(v.dtype), v):
                lm.original_tensors[k] = t
                continue
        transformed += 1
    for k, t in raw.items():
        if k in model_sd or not isinstance(t, torch.Tensor):
            continue
        if head_reset and any(k.startswith(h + ".") for h in classifier_names(lm.model)):
            lm.dropped_keys.append(k)
    for k in lm.missing_keys:
        t = raw.get(k)
        if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(model_sd[k].shape):
            lm.dropped_keys.append(k)
            lm.shape_mismatches[k] = (tuple(t.shape), tuple(model_sd[k].shape))
    if head_reset and lm.num_classes == 0:
        lm.notes.append(f"classifier dropped (headless; checkpoint has {cfg.get('num_classes')})")
    elif head_reset:
        lm.notes.append(
            f"classifier reset for {lm.num_classes} classes (checkpoint has "
            f"{cfg.get('num_classes')}); it gets a fresh init"
        )
    if transformed:
        lm.notes.append(f"{transformed} tensors were adapted by timm while loading")


def _timm_error(source: str, repo_id: str | None, e: Exception) -> SourceError:
    """One line for a hub/local-dir failure, with the next step."""
    kinds = {c.__name__ for c in type(e).__mro__}
    name = type(e).__name__
    msg = one_line(e)
    if "Unknown model" in msg:
        return SourceError(f"{source}: its config.json names an architecture timm lacks ({msg}).")
    if repo_id is not None:
        if "RepositoryNotFoundError" in kinds:
            return SourceError(
                f"Hub repository '{repo_id}' not found (or private): check the name, or log in "
                "with `hf auth login`."
            )
        if "GatedRepoError" in kinds:
            return SourceError(
                f"Hub repository '{repo_id}' is gated: accept its terms on the Hub, then log in."
            )
        if "RevisionNotFoundError" in kinds:
            return SourceError(f"Revision not found in '{repo_id}': check the @revision.")
        if kinds & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
            return SourceError(
                f"Cannot fetch '{repo_id}' from the Hugging Face Hub (offline, or not cached): "
                "connect and unset HF_HUB_OFFLINE, or download it first."
            )
        if "EntryNotFoundError" in kinds:
            return SourceError(
                f"Hub repository '{repo_id}' lacks a file timm needs ({msg}); is it a timm model?"
            )
        if kinds & {"ConnectionError", "TimeoutError", "HfHubHTTPError", "HTTPError"}:
            return SourceError(
                f"Cannot reach the Hugging Face Hub for '{repo_id}' ({name}: {msg}); "
                "check the network, or use a local file."
            )
    return SourceError(f"Cannot load '{source}' with timm: {name}: {msg}")


def model_revision(snapshot: Path | None, rev: str | None) -> str | None:
    """The commit a Hub snapshot folder (.../snapshots/<sha>) holds; else what was asked."""
    parts = snapshot.parts if snapshot is not None else ()
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return rev


def classifier_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        return [names]
    return list(names or [])


def classifier_keys(model: nn.Module, model_sd: Mapping[str, Any]) -> set[str]:
    """State-dict keys of the classifier head (timm's pretrained_cfg 'classifier')."""
    names = classifier_names(model)
    return {k for k in model_sd if any(k.startswith(n + ".") for n in names)}


def model_num_classes(model: nn.Module, requested: int | None) -> int | None:
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) else requested


def _model_args_of(model: nn.Module, options: SourceOptions) -> dict:
    """Reconstruction kwargs timm recorded (config.json model_args plus ours)."""
    args = dict(getattr(model, "_model_args", {}) or {})
    args.update(options.model_args)
    for k in ("num_classes", "pretrained_model_args", "pretrained_cfg", "pretrained_cfg_overlay"):
        args.pop(k, None)
    return args

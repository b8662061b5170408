"""SOURCE -> model plus what was loaded (DESIGN 2). Library code: logs, never prints.

A source is a timm architecture name (fresh weights), `hf-hub:org/repo[@rev]` or
`local-dir:PATH` (loaded by timm's own loaders), or a checkpoint file (`.safetensors`,
or a pickle loaded with `weights_only=True` unless the user trusts it). Files written by
other code bases are unwrapped (nested dicts, key prefixes) by matching names and shapes
against the architecture, so that self-supervised backbones load without hand surgery,
and everything that was not loaded is listed rather than silently lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._helpers import cut, jsonable, one_line
from ..errors import SourceError, UnsafePickleError
from ..options import SourceOptions
from ..output.metadata import Header, read_header, source_fields

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar", ".tar", ".pkl")
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
LOCAL_DIR_PREFIX = "local-dir:"

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
MIN_MATCH_FRACTION = 0.5  # of the model's parameters (classifier excluded) that must load
MAX_MISMATCH_FRACTION = 0.1  # of them that may have a same-name tensor of another shape,
MAX_MISMATCHES = 2  # or this many (a changed in_chans or pos_embed size)

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass
class LoadedModel:
    """A model built for a source, and the provenance the report and metadata need."""

    model: nn.Module
    architecture: str
    source: str
    pretrained: bool  # the source carried weights
    loaded_keys: set[str] = field(default_factory=set)  # state_dict keys filled from the source
    missing_keys: list[str] = field(default_factory=list)  # model keys left at their fresh init
    dropped_keys: list[str] = field(default_factory=list)  # checkpoint keys not loaded (as stored)
    original_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as stored
    revision: str | None = None  # resolved commit for hub sources
    model_args: dict = field(default_factory=dict)  # kwargs the architecture was built with
    num_classes: int | None = None  # the model's number of classes (0: headless)
    notes: list[str] = field(default_factory=list)  # things the user should know, one line each
    kind: str = "timm"  # "timm", "hf-hub", "local-dir" or "file"
    path: str | None = None  # the file (or folder) read, for file and local-dir sources
    repo_id: str | None = None  # "org/repo" for hub sources (the model card's base_model)
    file_format: str | None = None  # "safetensors" or "pickle" for file sources
    arch_from: str | None = None  # "name", "option", "config.json", "metadata" or "checkpoint"
    nested_key: str | None = None  # e.g. "teacher" or "state_dict" ("/"-joined when deeper)
    stripped_prefixes: list[str] = field(default_factory=list)
    key_map: dict[str, str] = field(default_factory=dict)
    # model key -> (checkpoint shape, model shape), for same-name tensors that were dropped
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )

    def metadata(self) -> dict[str, str]:
        """String metadata for the safetensors header (written by output/metadata.py)."""
        return source_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for the report: what was loaded, from where, how, and what not."""
        return {
            "source": self.source,
            "kind": self.kind,
            "path": self.path,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "file_format": self.file_format,
            "architecture": self.architecture,
            "arch_from": self.arch_from,
            "num_classes": self.num_classes,
            "model_args": {k: jsonable(v) for k, v in self.model_args.items()},
            "pretrained": self.pretrained,
            "nested_key": self.nested_key,
            "stripped_prefixes": list(self.stripped_prefixes),
            "key_map": dict(self.key_map),
            "loaded_count": len(self.loaded_keys),
            "missing_count": len(self.missing_keys),
            "dropped_count": len(self.dropped_keys),
            "missing_keys": list(self.missing_keys),
            "dropped_keys": list(self.dropped_keys),
            "shape_mismatches": {
                k: {"checkpoint": list(a), "model": list(b)}
                for k, (a, b) in self.shape_mismatches.items()
            },
            "notes": list(self.notes),
        }


@dataclass
class CheckpointInfo:
    """What `ckptinit info FILE` shows; read without building a model."""

    path: str
    format: str  # "safetensors" or "pickle"
    file_size: int  # bytes
    tensor_count: int
    parameter_count: int  # elements over all tensors in the file
    dtypes: dict[str, int]  # torch dtype name -> number of tensors
    metadata: dict[str, str]  # safetensors header; for pickles, scalar top-level entries
    architecture: str | None = None
    arch_from: str | None = None  # "metadata", "config.json" or "checkpoint"
    num_classes: int | None = None
    model_args: dict = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)  # ckptinit's keys, if it wrote it
    sections: dict[str, int] = field(default_factory=dict)  # pickles: nested dict -> tensors
    common_prefix: str | None = None  # shared dotted key prefix of the largest section


# --------------------------------------------------------------------------- entry points


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
    except TypeError as e:
        raise SourceError(f"Cannot build '{name}' with {kwargs}: {one_line(e)}") from e


def _pretrained_cfg_overlay(pretrained_cfg: Mapping[str, Any] | None) -> dict | None:
    """The fields of a config.json's pretrained_cfg that timm knows, minus weight locations."""
    if not pretrained_cfg:
        return None
    from timm.models._pretrained import PretrainedCfg

    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    skip = {"file", "url", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "custom_load"}
    return {k: v for k, v in pretrained_cfg.items() if k in known and k not in skip} or None


def load_source(source: str, options: SourceOptions | None = None) -> LoadedModel:
    """Resolve SOURCE (timm name, hf-hub:, local-dir: or a checkpoint file) into a model."""
    options = options or SourceOptions()
    if source.startswith(HUB_PREFIXES) or source.startswith(LOCAL_DIR_PREFIX):
        return _load_timm_pretrained(source, options)
    kind = _classify(source)
    if kind == "file":
        return _load_file_source(source, options)
    arch = options.arch
    if arch and arch != source:
        raise SourceError(
            f"SOURCE '{source}' is an architecture name and --arch says '{arch}'; give only one."
        )
    model = create_architecture(source, options)
    return LoadedModel(
        model=model,
        architecture=source,
        source=source,
        pretrained=False,
        model_args=dict(options.model_args),
        num_classes=_model_num_classes(model, options.num_classes),
        arch_from="name",
    )


def read_info(path: str | os.PathLike, trust_pickle: bool = False) -> CheckpointInfo:
    """Summarise a checkpoint file without building a model (safetensors: header only)."""
    p = _existing_file(str(path))
    size = p.stat().st_size
    obj = None
    if _is_safetensors(p):
        info = _safetensors_info(p, size)
    else:
        obj = _torch_load(p, trust_pickle)
        info = _pickle_info(p, size, obj)
    header = read_header(info.metadata)
    if header.architecture:
        info.architecture, info.arch_from = header.architecture, "metadata"
        info.num_classes = header.num_classes
        info.model_args = header.model_args(p.name)
    else:
        cfg = _read_config_beside(p)
        if cfg is not None:
            info.architecture, info.arch_from = cfg["architecture"], "config.json"
            info.num_classes = cfg.get("num_classes")
            info.model_args = cfg.get("model_args") or {}
        elif info.format == "pickle" and _checkpoint_arch(obj):
            info.architecture, info.arch_from = _checkpoint_arch(obj), "checkpoint"
    info.provenance = header.provenance
    return info


# --------------------------------------------------------------------------- hub / local-dir


def _load_timm_pretrained(source: str, options: SourceOptions) -> LoadedModel:
    """hf-hub: and local-dir: go through timm so that its filters and head adaptation apply."""
    import timm

    is_hub = source.startswith(HUB_PREFIXES)
    ident = source.split(":", 1)[1]
    if not ident:
        raise SourceError(f"'{source}' names no repository or folder after the prefix.")
    if options.arch:
        log.info("--arch is ignored for %s: its config.json names the architecture", source)
    if options.strip_prefix or options.key_map or options.use_ema:
        log.info("--strip-prefix/--key-map/--use-ema apply to checkpoint files only")
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
        model = timm.create_model(
            f"hf-hub:{ident}" if is_hub else source, pretrained=True, **kwargs
        )
        raw = _timm_raw_state_dict(model, ident, local_path)
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
        path=str(local_path) if local_path else None,
        repo_id=repo_id,
        revision=_hub_revision(repo_id, rev) if is_hub else None,
        arch_from="config.json",
        model_args=_model_args_of(model, options),
        num_classes=_model_num_classes(model, options.num_classes),
    )
    _account_timm_load(lm, raw, cfg)
    log.info(
        "Loaded %s (%s): %d tensors loaded, %d missing",
        source, arch, len(lm.loaded_keys), len(lm.missing_keys),
    )  # fmt: skip
    return lm


def _timm_raw_state_dict(
    model: nn.Module, ident: str, local_path: Path | None
) -> dict[str, torch.Tensor]:
    """The weights timm just loaded, re-read as stored (cached) to keep their original dtype."""
    import timm.models

    if local_path is not None:
        for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
            if (local_path / name).is_file():
                return timm.models.load_state_dict(str(local_path / name))
        for ext in (".safetensors", ".pth", ".pth.tar", ".bin"):
            files = sorted(local_path.glob(f"*{ext}"))
            if files:
                return timm.models.load_state_dict(str(files[0]))
        return {}
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id") or ident
    filename = cfg.get("hf_hub_filename")
    if filename:
        sd = timm.models.load_state_dict_from_hf(hub_id, filename)
    else:
        sd = timm.models.load_state_dict_from_hf(hub_id, weights_only=True)
    return timm.models.clean_state_dict(sd) if isinstance(sd, dict) else {}


def _account_timm_load(lm: LoadedModel, raw: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Fill loaded/missing/dropped/original_tensors with timm's loading rules.

    timm loads strictly, except that it discards the classifier when num_classes differs
    from the checkpoint's; tensors its checkpoint filter transformed count as loaded but are
    not kept as originals (they are not the stored bytes).
    """
    model_sd = lm.model.state_dict()
    head = _classifier_keys(lm.model, model_sd)
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
        if head_reset and any(k.startswith(h + ".") for h in _classifier_names(lm.model)):
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


def _hub_revision(repo_id: str | None, rev: str | None) -> str | None:
    """The commit the cached snapshot came from, without another network call."""
    if not repo_id:
        return rev
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", revision=rev)
    except Exception:  # noqa: BLE001 - provenance is best effort
        return rev
    if isinstance(path, str):
        parts = Path(path).parts
        if "snapshots" in parts:
            i = parts.index("snapshots")
            if i + 1 < len(parts):
                return parts[i + 1]
    return rev


# --------------------------------------------------------------------------- files


def _classify(source: str) -> str:
    """Tell a checkpoint path ("file") from a timm name ("timm"); refuse folders and typos."""
    p = Path(source).expanduser()
    if p.is_file():
        return "file"
    if p.is_dir():
        raise SourceError(
            f"'{source}' is a folder: use local-dir:{source} (config.json + weights)."
        )
    lower = source.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise SourceError(f"Checkpoint file not found: {source}")
    if "/" in source or os.sep in source or "\\" in source:
        hint = ""
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            hint = f" For a Hugging Face Hub repository use hf-hub:{source}."
        raise SourceError(f"No such file: {source}.{hint}")
    return "timm"


def _existing_file(source: str) -> Path:
    p = Path(source).expanduser()
    if not p.exists():
        raise SourceError(f"Checkpoint file not found: {source}")
    if not p.is_file():
        raise SourceError(f"'{source}' is not a file; for a timm folder use local-dir:{source}")
    return p


def _is_safetensors(p: Path) -> bool:
    """By suffix, else by sniffing the header (8-byte length then '{')."""
    if p.name.lower().endswith(SAFETENSORS_SUFFIXES):
        return True
    if p.name.lower().endswith(PICKLE_SUFFIXES):
        return False
    try:
        with p.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise SourceError(f"Cannot read {p}: {one_line(e)}") from e
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(p), device="cpu"), meta
    except Exception as e:
        raise SourceError(f"Cannot read {p.name} as safetensors: {one_line(e)}") from e


def _torch_load(p: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True unless trusted; refusals name --trust-pickle."""
    try:
        if trust_pickle:
            log.warning("Unpickling %s with weights_only=False (--trust-pickle)", p)
            return torch.load(str(p), map_location="cpu", weights_only=False)
        # argparse.Namespace holds training args in many checkpoints (DINO, timm); it builds
        # a plain attribute bag, so it is allowed like timm does.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise SourceError(f"Cannot unpickle {p.name}: {one_line(e)}") from e
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        needs = f"`{found.group(1)}`" if found else "objects"
        raise UnsafePickleError(
            f"Refusing to unpickle {p.name}: it needs {needs} beyond tensors and plain "
            "containers, and unpickling can run code; pass --trust-pickle only if you trust "
            "where it came from."
        ) from e
    except Exception as e:
        raise SourceError(f"Cannot read {p.name} as a PyTorch checkpoint: {one_line(e)}") from e


def _load_file_source(source: str, options: SourceOptions) -> LoadedModel:
    p = _existing_file(source)
    if _is_safetensors(p):
        obj, meta, fmt = *_load_safetensors(p), "safetensors"
    else:
        obj, meta, fmt = _torch_load(p, options.trust_pickle), {}, "pickle"
    header = read_header(meta)
    arch, arch_from, num_classes, model_args, pcfg = _resolve_architecture(p, options, header, obj)
    build = SourceOptions(num_classes=num_classes, model_args=model_args)
    model = create_architecture(arch, build, pretrained_cfg=pcfg)
    lm = LoadedModel(
        model=model,
        architecture=arch,
        source=source,
        pretrained=True,
        kind="file",
        path=str(p),
        file_format=fmt,
        arch_from=arch_from,
        model_args=dict(model_args),
        num_classes=_model_num_classes(model, num_classes),
        key_map=dict(options.key_map),
    )
    if header.source_revision:
        lm.notes.append(f"file was made from {header.source}@{header.source_revision}")
    _load_state_into(lm, obj, options)
    return lm


def _resolve_architecture(
    p: Path, options: SourceOptions, header: Header, obj: Any
) -> tuple[str, str, int | None, dict, dict | None]:
    """arch, where it came from, num_classes, model_args, pretrained_cfg for a file."""
    cfg = _read_config_beside(p)
    arch = arch_from = None
    num_classes: int | None = None
    model_args: dict = {}
    pcfg: dict | None = None
    if options.arch:
        arch, arch_from = options.arch, "option"
        if cfg is not None and _same_arch(cfg["architecture"], arch):
            num_classes, model_args, pcfg = cfg.get("num_classes"), cfg["model_args"], cfg["pcfg"]
        elif header.architecture and _same_arch(header.architecture, arch):
            num_classes = header.num_classes
            model_args = header.model_args(p.name)
    elif cfg is not None:
        arch, arch_from = cfg["architecture"], "config.json"
        num_classes, model_args, pcfg = cfg.get("num_classes"), cfg["model_args"], cfg["pcfg"]
    elif header.architecture:
        arch, arch_from = header.architecture, "metadata"
        num_classes = header.num_classes
        model_args = header.model_args(p.name)
    elif _checkpoint_arch(obj):
        arch, arch_from = _checkpoint_arch(obj), "checkpoint"
        log.info("Architecture %s taken from the checkpoint's own 'arch' entry", arch)
    if arch is None:
        raise SourceError(
            f"Cannot tell the architecture of {p.name}: no config.json beside it and no "
            "ckptinit metadata; pass --arch NAME (a timm model name, e.g. --arch resnet50)."
        )
    model_args = {**model_args, **options.model_args}
    model_args.pop("num_classes", None)
    if options.num_classes is not None:
        num_classes = options.num_classes
    if pcfg is not None and options.num_classes is not None:
        pcfg = {k: v for k, v in pcfg.items() if k != "num_classes"}
    return arch, arch_from, num_classes, model_args, pcfg


def _checkpoint_arch(obj: Any) -> str | None:
    """A timm name stored by the training code: MoCo's "arch", DINO's args.arch."""
    if not isinstance(obj, Mapping):
        return None
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    for value in (obj.get("arch"), args.get("arch") if isinstance(args, Mapping) else None):
        if isinstance(value, str) and _is_timm(value):
            return value
    return None


def _read_config_beside(p: Path) -> dict | None:
    """A timm config.json next to the file, normalised; None if absent or not timm's."""
    cfg_path = p.parent / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("Ignoring unreadable %s: %s", cfg_path, one_line(e))
        return None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        log.info("Ignoring %s: not a timm config (no 'architecture')", cfg_path)
        return None
    pcfg = cfg.get("pretrained_cfg")
    if not isinstance(pcfg, dict):  # legacy single-dict format
        pcfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features")}
    num_classes = cfg.get("num_classes", pcfg.get("num_classes"))
    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        model_args = {}
    pcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in pcfg.items()}
    return {
        "architecture": cfg["architecture"],
        "num_classes": num_classes if isinstance(num_classes, int) else None,
        "model_args": dict(model_args),
        "pcfg": pcfg,
    }


# --------------------------------------------------------------------------- matching


@dataclass
class _Match:
    """One way of reading a checkpoint dict into the model."""

    nested: str | None
    prefixes: list[str]
    tensors: dict[str, torch.Tensor]  # as stored, all tensor entries of the nested dict
    loaded: dict[str, str]  # model key -> checkpoint key
    mismatched: dict[str, str]  # model key -> checkpoint key (same name, other shape)
    rank: int
    tie: str | None = None  # another prefix that matched equally well


def _load_state_into(lm: LoadedModel, obj: Any, options: SourceOptions) -> None:
    """Unwrap, match by name and shape, refuse poor matches, then load with dtype casts."""
    model_sd = lm.model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in model_sd.items()}
    candidates = _candidate_dicts(obj, options.use_ema)
    if not candidates:
        raise SourceError(
            f"No tensors found in {Path(lm.path or lm.source).name}: is it a model checkpoint?"
        )
    best: _Match | None = None
    for rank, (nested, tensors) in enumerate(candidates):
        m = _best_prefix(nested, tensors, shapes, options, rank)
        if best is None or (len(m.loaded), -m.rank) > (len(best.loaded), -best.rank):
            best = m
    assert best is not None
    adapted = _adapt_with_timm_filter(lm.model, best, model_sd)
    _check_match(lm, best, model_sd, adapted)

    lm.nested_key = best.nested
    lm.stripped_prefixes = best.prefixes
    with_ema = best.nested is not None and any(_is_ema(p) for p in best.nested.split("/"))
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
    head = _classifier_keys(lm.model, model_sd)
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


def _candidate_dicts(obj: Any, use_ema: bool) -> list[tuple[str | None, dict[str, torch.Tensor]]]:
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
    if any(_is_ema(p) for p in parts):
        return 0 if use_ema else 2 + len(NESTED_KEYS)
    if all(p in NESTED_KEYS for p in parts):
        return 1 + NESTED_KEYS.index(parts[0])
    return 3 + len(NESTED_KEYS)


def _is_ema(key: str) -> bool:
    """model_ema, state_dict_ema, ema, ema_model... (EMA_KEYS and their relatives)."""
    return key in EMA_KEYS or "ema" in key.lower().split("_")


def _best_prefix(
    nested: str | None,
    tensors: dict[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    options: SourceOptions,
    rank: int,
) -> _Match:
    """The prefix (or the user's prefixes) that loads the most tensors by name and shape."""
    if options.strip_prefix:
        loaded, mism = _match_keys(tensors, shapes, list(options.strip_prefix), options.key_map)
        return _Match(nested, list(options.strip_prefix), tensors, loaded, mism, rank)
    best: _Match | None = None
    for prefix in _prefix_candidates(tensors, shapes, options.key_map):
        strip = [prefix] if prefix else []
        loaded, mism = _match_keys(tensors, shapes, strip, options.key_map)
        if best is None or len(loaded) > len(best.loaded):
            best = _Match(nested, strip, tensors, loaded, mism, rank)
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
    common = _common_dotted_prefix(tensors)
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
        nk = _rename(k, strip, key_map)
        if nk not in shapes or nk in loaded:
            continue
        if tuple(t.shape) == shapes[nk]:
            loaded[nk] = k
            mism.pop(nk, None)
        else:
            mism.setdefault(nk, k)
    return loaded, mism


def _rename(key: str, strip: list[str], key_map: Mapping[str, str]) -> str:
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


def _common_dotted_prefix(keys: Iterable[str]) -> str:
    keys = list(keys)
    if not keys:
        return ""
    common = os.path.commonprefix(keys)
    cut = common.rfind(".")
    return common[: cut + 1] if cut >= 0 else ""


def _adapt_with_timm_filter(
    model: nn.Module, m: _Match, model_sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Same-name tensors of another shape that timm's own filter can resize to the model.

    timm's `checkpoint_filter_fn` (next to the model class) resamples position embeddings
    and patch embeddings for another image or patch size. Only the mismatched tensors are
    taken from its output, so everything else stays exactly as stored.
    """
    if not m.mismatched:
        return {}
    import sys

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
    m: _Match,
    model_sd: Mapping[str, torch.Tensor],
    adapted: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse a checkpoint that fits the architecture poorly: the wrong --arch, most likely.

    Name+shape matches alone are fooled by sibling architectures (resnet50 weights give
    resnet18 most of its BatchNorm and 3x3 convs), so many same-name tensors with other
    shapes also count as a poor fit.
    """
    head = _classifier_keys(lm.model, model_sd)
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
    m: _Match, key_map: Mapping[str, str], model: nn.Module, model_sd: Mapping[str, Any]
) -> list[str]:
    """Dropped tensors that look like parts of the model (a deeper sibling architecture?).

    Heads (the classifier's top module, and common projection-head names) are expected to
    differ between pre-training and the model, so they do not count.
    """
    tops = {k.split(".", 1)[0] for k in model_sd}
    heads = {n.split(".", 1)[0] for n in _classifier_names(model)}
    heads |= {"fc", "head", "heads", "classifier", "last_linear", "projector", "predictor"}
    used = set(m.loaded.values())
    out = []
    for k in m.tensors:
        if k in used or (m.prefixes and not k.startswith(tuple(m.prefixes))):
            continue
        nk = _rename(k, m.prefixes, key_map)
        top = nk.split(".", 1)[0]
        if nk not in model_sd and top in tops and top not in heads:
            out.append(k)
    return out


# --------------------------------------------------------------------------- info helpers


def _safetensors_info(p: Path, size: int) -> CheckpointInfo:
    from safetensors import safe_open

    dtypes: Counter[str] = Counter()
    count = 0
    n = 0
    try:
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            for k in keys:
                s = f.get_slice(k)
                dtypes[_SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype().lower())] += 1
                shape = s.get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                count += numel
                n += 1
    except Exception as e:
        raise SourceError(f"Cannot read {p.name} as safetensors: {one_line(e)}") from e
    return CheckpointInfo(
        path=str(p),
        format="safetensors",
        file_size=size,
        tensor_count=n,
        parameter_count=count,
        dtypes=dict(dtypes),
        metadata=meta,
        common_prefix=_common_dotted_prefix(keys) or None,
    )


def _pickle_info(p: Path, size: int, obj: Any) -> CheckpointInfo:
    dtypes: Counter[str] = Counter()
    sections: dict[str, int] = {}
    seen: set[int] = set()
    count = n = 0
    biggest: list[str] = []
    for path, tensors in _candidate_dicts(obj, use_ema=False):
        sections[path or ""] = len(tensors)
        if len(tensors) > len(biggest):
            biggest = list(tensors)
        for t in tensors.values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            n += 1
            count += t.numel()
            dtypes[str(t.dtype).replace("torch.", "")] += 1
    meta: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(k, str) and isinstance(v, (str, int, float, bool)):
                meta[k] = str(v)
            elif isinstance(k, str) and isinstance(v, argparse.Namespace):
                meta[k] = cut(repr(vars(v)), 500)
    return CheckpointInfo(
        path=str(p),
        format="pickle",
        file_size=size,
        tensor_count=n,
        parameter_count=count,
        dtypes=dict(dtypes),
        metadata=meta,
        sections=sections,
        common_prefix=_common_dotted_prefix(biggest) or None,
    )


# --------------------------------------------------------------------------- small helpers


def _classifier_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        return [names]
    return list(names or [])


def _classifier_keys(model: nn.Module, model_sd: Mapping[str, Any]) -> set[str]:
    """State-dict keys of the classifier head (timm's pretrained_cfg 'classifier')."""
    names = _classifier_names(model)
    return {k for k in model_sd if any(k.startswith(n + ".") for n in names)}


def _model_num_classes(model: nn.Module, requested: int | None) -> int | None:
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) else requested


def _model_args_of(model: nn.Module, options: SourceOptions) -> dict:
    """Reconstruction kwargs timm recorded (config.json model_args plus ours)."""
    args = dict(getattr(model, "_model_args", {}) or {})
    args.update(options.model_args)
    for k in ("num_classes", "pretrained_model_args", "pretrained_cfg", "pretrained_cfg_overlay"):
        args.pop(k, None)
    return args


def _same_arch(a: str, b: str) -> bool:
    return a.split(".")[0] == b.split(".")[0]


def _is_timm(name: str) -> bool:
    import timm

    try:
        return bool(timm.is_model(name))
    except Exception:  # noqa: BLE001
        return False


"""A Hub-ready folder (`-o FOLDER`): the weights, timm's config.json, the model card, the
JSON report and the two plots, written into a temporary folder beside the target and
renamed into place, so that a failed or interrupted run leaves no half folder.

`timm.create_model("local-dir:FOLDER", pretrained=True)` loads the result, and after an
upload so does `hf-hub:REPO_ID`: config.json is written by timm's own writer, with
ckptinit's tag and the preprocessing the calibration actually used.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._helpers import one_line
from ..errors import OutputError, UsageError
from .atomic import check_parent
from .card import public_report, render_card

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..report import RunReport

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, CARD, REPORT = "model.safetensors", "config.json", "README.md", \
    "ckptinit_report.json"
TAG = "ckptinit"  # pretrained_cfg.tag: these weights are ckptinit's, not the registry's
# What ckptinit writes into a folder, and what the Hub tooling may add; --force replaces a
# folder that holds nothing else (it never deletes files it did not write).
OWN_FILES = frozenset({WEIGHTS, CONFIG, CARD, REPORT, "change_rates.png", "statistics.png",
                       ".gitattributes", ".cache"})
NOT_FOLDER_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".json", ".png")
DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
# pretrained_cfg fields that describe the weights of the source; a fresh architecture's
# weights are ckptinit's own, so they are dropped for it
SOURCE_WEIGHT_FIELDS = ("license", "description", "origin_url", "paper_name", "paper_ids",
                        "notes", "label_names", "label_descriptions", "test_input_size",
                        "test_crop_pct", "test_pool_size")


def is_folder_output(path: str | Path) -> bool:
    """`-o` names a folder unless it ends in .safetensors."""
    return Path(path).suffix.lower() != ".safetensors"


def check_folder(path: str | Path, force: bool) -> Path:
    """Refuse early (before any work) a folder output that exists or cannot be written."""
    path = Path(path)
    if path.suffix.lower() in NOT_FOLDER_SUFFIXES:
        raise UsageError(f"Output '{path}': ckptinit writes a .safetensors file or a folder "
                         "(a name without .safetensors); rename the output.")
    if path.exists() and not path.is_dir():
        raise OutputError(f"Output '{path}' is a file; give a new folder name, or a name "
                          "ending in .safetensors for a single file.")
    if path.is_dir():
        if not force:
            raise OutputError(f"Output folder '{path}' already exists; pass --force to "
                              "replace it.")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise OutputError(f"Output folder '{path}' holds files ckptinit did not write "
                              f"({', '.join(foreign[:3])}); --force only replaces ckptinit's "
                              "own folders: move them or choose another folder.")
    return check_parent(path)


def write_folder(
    path: str | Path,
    *,
    model: nn.Module,
    metadata: dict[str, str],
    report: RunReport,
    originals: dict[str, torch.Tensor] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    force: bool = False,
) -> Path:
    """Write the folder through a temporary one and a rename; returns its path."""
    from .checkpoint import save_checkpoint
    from .plots import plot_all

    path = check_folder(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_checkpoint(model, tmp / WEIGHTS, metadata, originals=originals)
        published = public_report(report)
        license = write_config(model, tmp / CONFIG, published, license)
        (tmp / REPORT).write_text(json.dumps(published, indent=2) + "\n")
        plot_all(report, tmp)
        (tmp / CARD).write_text(render_card(published, license=license, repo_id=repo_id),
                                encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; follow the umask
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", path)
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an old folder (checked by `check_folder`) is moved aside
    first and deleted only once the new one is in place."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_config(
    model: nn.Module, path: Path, report: Mapping[str, Any], license: str | None = None
) -> str | None:
    """timm's config.json for `model`, with ckptinit's tag and the preprocessing used.

    Written by timm's own `save_config_for_hf` (architecture, num_classes, num_features,
    global_pool, model_args, pretrained_cfg); then the pretrained_cfg gets ckptinit's tag,
    the data config of the calibration, and `license` (default: the source's licence when
    the weights came from a source, none for a fresh architecture). Returns the licence.
    """
    transform = (report.get("data") or {}).get("transform") or {}
    data_config = {k: transform[k] for k in DATA_KEYS if transform.get(k) is not None}
    save = _timm_config_writer()
    kwargs = {"data_config": data_config} if "data_config" in inspect.signature(save).parameters \
        else {}
    try:
        save(model, str(path), model_config={"pretrained_cfg": {"tag": TAG}}, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise OutputError(f"Cannot write config.json for this model ({one_line(e)}); write a "
                          ".safetensors file instead (-o NAME.safetensors).") from e
    config = json.loads(path.read_text())
    pretrained_cfg = config.setdefault("pretrained_cfg", {})
    if not (report.get("source") or {}).get("pretrained"):
        for key in SOURCE_WEIGHT_FIELDS:
            pretrained_cfg.pop(key, None)
    pretrained_cfg["tag"] = TAG
    pretrained_cfg.update(data_config)  # what the weights were calibrated with, exactly
    if license:
        pretrained_cfg["license"] = license
    path.write_text(json.dumps(config, indent=2) + "\n")
    return pretrained_cfg.get("license")


def _timm_config_writer():
    """timm's config.json writer (public in some releases, in `timm.models._hub` in all)."""
    import timm.models

    writer = getattr(timm.models, "save_config_for_hf", None)
    if writer is None:
        from timm.models._hub import save_config_for_hf as writer
    return writer


def read_folder(path: str | Path) -> dict[str, Any]:
    """What `push` needs from a folder: its config.json and report (refused when the
    folder is not one timm can load)."""
    path = Path(path)
    if not path.is_dir():
        raise OutputError(f"'{path}' is not a folder; write one with `ckptinit rescale "
                          "SOURCE -o FOLDER`.")
    missing = [n for n in (WEIGHTS, CONFIG) if not (path / n).is_file()]
    if missing:
        raise OutputError(f"Folder '{path}' lacks {' and '.join(missing)}; write it with "
                          "`ckptinit rescale SOURCE -o FOLDER` (or timm's save_for_hf).")
    try:
        config = json.loads((path / CONFIG).read_text())
        report = json.loads((path / REPORT).read_text()) if (path / REPORT).is_file() \
            else None
    except (OSError, ValueError) as e:
        raise OutputError(f"Cannot read folder '{path}': {one_line(e)}") from e
    return {"config": config, "report": report}

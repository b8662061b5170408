"""Hugging Face Hub dataset ids: short aliases, a fast pre-flight that pins the revision,
streaming, and one-line messages for offline, gated, not-found and network failures."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator

from ..._helpers import one_line
from ...errors import DataError
from ...options import CalibrationOptions
from .base import Source, quiet_datasets
from .stream import stream_source

log = logging.getLogger(__name__)

# Short names people type -> canonical Hub ids (the old un-namespaced ids now redirect or fail).
HUB_ALIASES = {
    "imagenet": "ILSVRC/imagenet-1k",
    "imagenet-1k": "ILSVRC/imagenet-1k",
    "imagenet1k": "ILSVRC/imagenet-1k",
    "cifar10": "uoft-cs/cifar10",
    "cifar-10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "cifar-100": "uoft-cs/cifar100",
    "food101": "ethz/food101",
    "food-101": "ethz/food101",
    "tiny-imagenet": "zh-plus/tiny-imagenet",
    "mini-imagenet": "timm/mini-imagenet",
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "fashion-mnist": "zalando-datasets/fashion_mnist",
    "beans": "AI-Lab-Makerere/beans",
}


def hub_source(data: str, options: CalibrationOptions, need: int) -> Source:
    repo_id = HUB_ALIASES.get(data.lower(), data)
    notes = []
    if repo_id != data:
        log.info("Dataset '%s' is the Hub dataset '%s'", data, repo_id)
        notes.append(f"'{data}' is the Hub dataset '{repo_id}'")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception:
        raise DataError(f"'{data}' is neither an existing path nor a valid dataset id; pass "
                        "an image folder, a dataset id, or 'samples'.") from None
    if _hub_offline():
        raise _offline_error(repo_id)
    token = options.token or None
    sha = dataset_revision(repo_id, options.revision, token)
    revision = sha or options.revision
    split = options.split or "train"
    import datasets

    log.info("Streaming %s (split %s, revision %s)", repo_id, split, revision or "main")
    with quiet_datasets(), _hub_errors(repo_id, split):
        ds = datasets.load_dataset(repo_id, name=options.config, split=split, streaming=True,
                                   revision=revision, token=token)
    src = stream_source(ds, options, need, label=repo_id)
    src.kind, src.resolved, src.split = "hub", repo_id, split
    src.config, src.revision = options.config, revision
    src.notes[:0] = notes
    return src


def check_online(data: str) -> None:
    """Refuse a Hub dataset id while offline mode is on, before any model is built."""
    if _hub_offline():
        repo_id = HUB_ALIASES.get(data.lower(), data)
        raise _offline_error(repo_id)


def _hub_offline() -> bool:
    """Offline mode from the environment or from already-imported hub/datasets settings."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    ds_mod = sys.modules.get("datasets")
    return bool(getattr(getattr(ds_mod, "config", None), "HF_HUB_OFFLINE", False))


def dataset_revision(repo_id: str, revision: str | None, token: str | None) -> str | None:
    """Fast pre-flight: fails in seconds (no network, unknown id, gated) and pins the sha."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub import errors as hf_errors

    from ... import __version__

    try:
        info = HfApi(library_name="ckptinit", library_version=__version__).dataset_info(
            repo_id, revision=revision, token=token, timeout=10)
    except hf_errors.GatedRepoError:
        raise DataError(_gated_message(repo_id)) from None
    except hf_errors.RevisionNotFoundError:
        raise DataError(f"Revision '{revision}' not found for dataset '{repo_id}'; pass a "
                        "branch, tag or commit that exists.") from None
    except hf_errors.RepositoryNotFoundError:
        raise DataError(_not_found_message(repo_id)) from None
    except hf_errors.HfHubHTTPError as e:
        raise DataError(f"The Hub refused dataset '{repo_id}': "
                        f"{one_line(e, 200, tidy=False)}") from None
    except Exception as e:
        raise DataError(_network_message(repo_id, e)) from None
    if getattr(info, "gated", False) and not (token or get_token()):
        raise DataError(_gated_message(repo_id))
    return getattr(info, "sha", None)


def _offline_error(repo_id: str) -> DataError:
    return DataError(f"Cannot stream dataset '{repo_id}': Hugging Face Hub offline mode is on "
                     "(HF_HUB_OFFLINE=1); pass a local image or dataset folder, or 'samples'.")


def _gated_message(repo_id: str) -> str:
    return (f"Dataset '{repo_id}' is gated: request access on "
            f"https://huggingface.co/datasets/{repo_id}, then run `hf auth login` or pass "
            "--token.")


def _not_found_message(repo_id: str) -> str:
    return (f"Dataset '{repo_id}' was not found on the Hugging Face Hub (check the id; pass "
            "--token for a private one), nor as a local path; or pass 'samples'.")


def _network_message(repo_id: str, e: BaseException) -> str:
    return (f"Cannot reach the Hugging Face Hub to stream '{repo_id}' ({type(e).__name__}: "
            f"{one_line(e, 200, tidy=False)}); check the connection, or pass a local folder "
            "or 'samples'.")


@contextlib.contextmanager
def _hub_errors(repo_id: str, split: str) -> Iterator[None]:
    """Map what `datasets.load_dataset` raises for a Hub id to one-line DataErrors."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        name = type(e).__name__
        text = str(e)
        if name == "DatasetNotFoundError":
            if "gated" in text.replace(repo_id, "").lower():
                raise DataError(_gated_message(repo_id)) from None
            raise DataError(_not_found_message(repo_id)) from None
        if isinstance(e, ValueError):
            found = re.search(r"Available splits: (\[.*?\])", text)
            if found or "split" in text.lower():
                listed = (f"; splits: {found.group(1)}" if found
                          else f" ({one_line(e, 200, tidy=False)})")
                raise DataError(f"Split '{split}' not found in dataset '{repo_id}'{listed}. "
                                "Pass --split.") from None
            configs = re.search(r"available configs: (\[.*?\])", text, re.IGNORECASE)
            if configs:
                raise DataError(f"Dataset '{repo_id}' has several configs; pass --config, one "
                                f"of {configs.group(1)}.") from None
            raise DataError(f"Cannot open dataset '{repo_id}': "
                            f"{one_line(e, 200, tidy=False)}") from None
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or "http" in name.lower() \
                or "connect" in name.lower() or "timeout" in name.lower():
            raise DataError(_network_message(repo_id, e)) from None
        raise DataError(f"Cannot open dataset '{repo_id}': {name}: "
                        f"{one_line(e, 200, tidy=False)}") from None

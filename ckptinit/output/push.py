"""Upload a Hub-ready folder to the Hugging Face Hub in one commit (huggingface_hub's HfApi).

The token comes from the caller, else from huggingface_hub's own lookup (HF_TOKEN, then
the `hf auth login` file), and the endpoint from HF_ENDPOINT, as the `hf` CLI does. Every
Hub failure becomes one PublishError line that says what to do next, and the token is
taken out of every message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from .._helpers import one_line
from ..errors import CkptInitError, PublishError, UsageError
from .card import render_card
from .folder import CARD, read_folder

log = logging.getLogger(__name__)

HUB_URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "hf://")
OTHER_REPO_TYPES = ("datasets/", "spaces/", "buckets/")
LOADING_CODE = re.compile(r'create_model\("hf-hub:([^"]+)"')  # the card's repository
NETWORK_ERRORS = {"TransportError", "ConnectionError", "TimeoutError", "TimeoutException"}


@dataclass
class PushResult:
    """Where the upload landed."""

    repo_id: str
    commit_url: str
    pr_url: str | None = None


def normalize_repo_id(repo_id: str) -> str:
    """'org/name' from what a user may paste (a Hub URL too); a dataset or Space is refused."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = repo_id.strip().rstrip("/")
    for prefix in HUB_URL_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
    if text.startswith(OTHER_REPO_TYPES):
        kind = text.split("/", 1)[0][:-1]
        raise UsageError(f"'{repo_id}' names a {kind} repository; ckptinit uploads models: give "
                         "a model repository id such as your-name/model-name.")
    try:
        validate_repo_id(text)
    except HFValidationError as e:
        why = one_line(e).rstrip(".")
        raise UsageError(f"'{repo_id}' is not a Hub repository id ({why}); give "
                         "your-name/model-name.") from e
    return text


def resolve_token(token: str | None) -> str:
    """The token to use: the one given, else huggingface_hub's (HF_TOKEN, or the login)."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError("Not logged in to the Hugging Face Hub: run `hf auth login`, set "
                           "HF_TOKEN, or pass --token.")
    return token


def _api(token: str, endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="ckptinit",
                 library_version=__version__)


def check_push(
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    force: bool = False,
    endpoint: str | None = None,
) -> str:
    """Refuse before any work an upload that would fail: no login, a bad repository id, or
    (without `force`) a repository that already has a model card. Returns the repo id."""
    repo_id = normalize_repo_id(repo_id)
    token = resolve_token(token)
    if not force:
        api = _api(token, endpoint)
        with hub_errors(repo_id, revision, token, api.endpoint):
            _refuse_existing_card(api, repo_id, revision)
    return repo_id


def _refuse_existing_card(api, repo_id: str, revision: str | None) -> None:
    if api.file_exists(repo_id, CARD, revision=revision):
        raise PublishError(f"'{repo_id}' already has a model card (README.md); pass --force "
                           "to replace it, or push to another repository.")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    force: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Create the repository if needed and upload `folder` in one commit.

    A model card already in the repository is only replaced with `force`. `revision` is a
    branch, made from main when it does not exist; `create_pr` opens a pull request
    against main instead of committing to it.
    """
    contents = read_folder(folder)
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; drop --revision.")
    repo_id = normalize_repo_id(repo_id)
    token = resolve_token(token)
    api = _api(token, endpoint)
    message = commit_message or _default_message(contents["config"])
    with hub_errors(repo_id, revision, token, api.endpoint):
        if not api.repo_exists(repo_id):  # an existing one keeps its visibility
            repo_id = api.create_repo(repo_id, private=True if private else None,
                                      exist_ok=True).repo_id
        if revision not in (None, "main") and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if not force:
            _refuse_existing_card(api, repo_id, None if create_pr else revision)
        refresh_card(folder, contents, repo_id)
        log.info("uploading %s to %s", folder, repo_id)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                   commit_message=message, revision=revision,
                                   create_pr=create_pr)
    return PushResult(repo_id=repo_id, commit_url=str(commit.commit_url),
                      pr_url=str(commit.pr_url) if commit.pr_url else None)


def _default_message(config: dict[str, Any]) -> str:
    arch = config.get("architecture") or "model"
    return f"Upload {arch} initialised by ckptinit {__version__}"


def refresh_card(folder: str | Path, contents: dict[str, Any], repo_id: str) -> bool:
    """Put the repository into the card's loading code when the card is one ckptinit
    rendered for this folder's report (for no repository or another one); a card edited
    by hand is left as it is. Returns whether the card changed."""
    report, path = contents.get("report"), Path(folder) / CARD
    if report is None or not path.is_file():
        return False
    license = (contents["config"].get("pretrained_cfg") or {}).get("license")
    text = path.read_text(encoding="utf-8")
    named = LOADING_CODE.search(text)
    rendered_for = [None] + ([named.group(1)] if named else [])
    if not any(text == render_card(report, license=license, repo_id=r) for r in rendered_for) \
            or named and named.group(1) == repo_id:
        return False
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(render_card(report, license=license, repo_id=repo_id), encoding="utf-8")
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------- errors


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, token: str | None,
               endpoint: str) -> Iterator[None]:
    """Hub failures as one PublishError line with the next step; never the token."""
    try:
        yield
    except CkptInitError as e:
        raise type(e)(scrub(str(e), token)) from None
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one line
        raise PublishError(scrub(hub_message(e, repo_id, revision, endpoint), token)) from e


def scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def hub_message(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> str:
    """What went wrong talking to the Hub, and what to do about it."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it and push again."
    if isinstance(e, GatedRepoError):
        return (f"'{repo_id}' is a gated repository this token cannot write to: ask its "
                "owners for access, or push to a repository of your own.")
    if isinstance(e, RepositoryNotFoundError):
        return (f"Repository '{repo_id}' not found, or not visible with this token: check the "
                "name, and that the token may write to it (`hf auth whoami`).")
    if isinstance(e, RevisionNotFoundError):
        return (f"Branch '{revision}' not found in '{repo_id}': check --revision, or leave it "
                "out to push to main.")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return ("The Hub rejected the token (401 Unauthorized): log in again with `hf auth "
                    "login`, or pass a valid --token.")
        if status == 403:
            return (f"No write access to '{repo_id}' (403 Forbidden): use a token with write "
                    "permission for its namespace, or push to your own namespace.")
        return (f"The Hub refused the upload to '{repo_id}' ({status}: "
                f"{one_line(getattr(e, 'server_message', None) or e, 160)}); try again later.")
    if isinstance(e, ValueError) and "README.md" in str(e):
        return (f"The Hub refused the model card's metadata ({one_line(e, 160)}); fix "
                "README.md (e.g. the --license) and push again.")
    kinds = {c.__name__ for c in type(e).__mro__}
    if kinds & NETWORK_ERRORS:
        return (f"Cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}): check "
                "the network, or HF_ENDPOINT.")
    return f"Upload to '{repo_id}' failed: {type(e).__name__}: {one_line(e, 200)}"

"""Uploading a folder, against a local HTTP stand-in for the Hub (never the real one)."""

from __future__ import annotations

import pytest

from ckptinit.errors import PublishError, UsageError
from ckptinit.output.push import check_push, normalize_repo_id, push_folder
from tests.output.conftest import TOKEN


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("xet", [True, False], ids=["pipelined", "create_commit"])
def test_push_uploads_every_file_in_one_commit(hub, folder, monkeypatch, xet):
    """Both of huggingface_hub's upload paths (with and without hf_xet installed)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", not xet)
    result = push_folder(folder, "me/r18-init", token=TOKEN, endpoint=hub.url,
                         commit_message="first upload", private=True)
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.message) == ("me/r18-init", "main",
                                                                 "first upload")
    assert commit.files == _files(folder)  # every file, byte for byte
    assert result.commit_url.startswith(f"{hub.url}/me/r18-init/commit/")
    assert result.pr_url is None
    assert hub.created == [{"name": "r18-init", "organization": "me", "visibility": "private"}]
    assert hub.repos["me/r18-init"].private
    assert commit.user_agent.startswith("ckptinit/")
    assert commit.authorization == f"Bearer {TOKEN}"


def test_the_card_gets_the_repository_it_was_pushed_to(hub, folder):
    assert 'local-dir:PATH/TO/THIS/FOLDER' in (folder / "README.md").read_text()
    push_folder(folder, "me/a", token=TOKEN, endpoint=hub.url)
    card = hub.files("me/a")["README.md"].decode()
    assert 'timm.create_model("hf-hub:me/a", pretrained=True)' in card
    assert card.startswith("---\n") and "\n# a\n" in card
    push_folder(folder, "my-org/b", token=TOKEN, endpoint=hub.url)  # and again elsewhere
    assert 'create_model("hf-hub:my-org/b"' in hub.files("my-org/b")["README.md"].decode()
    (folder / "README.md").write_text("# my own words\n")
    push_folder(folder, "me/c", token=TOKEN, endpoint=hub.url)
    assert hub.files("me/c")["README.md"] == b"# my own words\n"  # edited: left alone


def test_existing_model_card_is_refused_unless_force(hub, folder):
    hub.add_repo("me/taken", {"README.md": b"# someone's card\n"})
    for check in (lambda: check_push("me/taken", token=TOKEN, endpoint=hub.url),
                  lambda: push_folder(folder, "me/taken", token=TOKEN, endpoint=hub.url)):
        with pytest.raises(PublishError, match="already has a model card.*--force"):
            check()
    assert hub.commits == []
    assert check_push("me/taken", token=TOKEN, endpoint=hub.url, force=True) == "me/taken"
    push_folder(folder, "me/taken", token=TOKEN, endpoint=hub.url, force=True)
    assert hub.files("me/taken")["README.md"] == (folder / "README.md").read_bytes()


def test_revision_makes_a_branch_and_create_pr_opens_a_pull_request(hub, folder):
    push_folder(folder, "me/m", token=TOKEN, endpoint=hub.url, revision="v1")
    assert hub.commits[-1].revision == "v1"
    assert "README.md" not in hub.files("me/m", "main")
    result = push_folder(folder, "me/m", token=TOKEN, endpoint=hub.url, create_pr=True,
                         force=True)
    assert hub.commits[-1].revision == "refs/pr/1"
    assert len(hub.pulls) == 1 and result.pr_url == f"{hub.url}/me/m/discussions/1"
    with pytest.raises(UsageError, match="--create-pr"):
        push_folder(folder, "me/m", token=TOKEN, endpoint=hub.url, create_pr=True,
                    revision="v1")


@pytest.mark.parametrize("repo, token, setup, match", [
    ("me/x", None, None, "Not logged in.*hf auth login"),
    ("me/x", "hf_wrong", None, "rejected the token.*401"),
    ("someone/x", TOKEN, None, "No write access to 'someone/x'.*403"),
    ("someone/gated", TOKEN, "gated", "'someone/gated' is a gated repository"),
    ("me/gone", TOKEN, "vanishing", "not found"),
    ("datasets/me/x", TOKEN, None, "dataset repository"),
    ("https://huggingface.co/spaces/me/x", TOKEN, None, "space repository"),
    ("me/bad--name", TOKEN, None, "not a Hub repository id"),
])
def test_hub_errors_are_one_line_with_the_next_step(hub, folder, repo, token, setup, match):
    if setup:
        hub.add_repo(repo, **{setup: True})
    hub.echo_token_in_errors = True  # even a server that repeats the token cannot leak it
    with pytest.raises((PublishError, UsageError), match=match) as err:
        push_folder(folder, repo, token=token, endpoint=hub.url)
    message = str(err.value)
    assert "\n" not in message and TOKEN not in message and "hf_wrong" not in message
    assert hub.commits == []


def test_server_errors_never_show_the_token(hub, folder, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # no retries
    hub.broken_commits = True
    with pytest.raises(PublishError, match="refused the upload to 'me/x' \\(500") as err:
        push_folder(folder, "me/x", token=TOKEN, endpoint=hub.url)
    assert "Internal error while committing for Bearer ***" in str(err.value)
    assert TOKEN not in str(err.value)


def test_network_down_and_offline_mode(folder, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PublishError, match="Cannot reach the Hugging Face Hub at "
                                           "http://127.0.0.1:9"):
        push_folder(folder, "me/x", token=TOKEN, endpoint="http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        push_folder(folder, "me/x", token=TOKEN, endpoint="http://127.0.0.1:9")


def test_a_folder_timm_cannot_load_is_not_uploaded(hub, tmp_path):
    from ckptinit.errors import OutputError

    with pytest.raises(OutputError, match="model.safetensors and config.json"):
        push_folder(tmp_path, "me/x", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_repo_ids_from_urls():
    assert normalize_repo_id("https://huggingface.co/me/model/") == "me/model"
    assert normalize_repo_id(" hf://me/model ") == "me/model"

"""`ckptinit push` and `rescale --push-to`, run as the user runs them: in a fresh process
whose environment (HF_ENDPOINT, HF_TOKEN, HF_HOME) points at a local HTTP stand-in for the
Hub. huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so only a
new process tests the environment; the suite's HF_HUB_OFFLINE=1 is left out of it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.helpers import ARCH, TINY
from tests.hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_cli_write_token_0123456789"


@pytest.fixture
def hub():
    with FakeHub({TOKEN: "me"}) as server:
        yield server


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    import timm

    from ckptinit.output.folder import write_folder
    from tests.output.helpers import make_report

    out = tmp_path_factory.mktemp("push") / "model"
    write_folder(out, model=timm.create_model(ARCH, num_classes=10), metadata={},
                 report=make_report(), license="mit")
    return out


@pytest.fixture
def folder(built, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(built, tmp_path / "model"))


def ckptinit(hub: FakeHub, tmp_path: Path, *args, token: str | None = None):
    """Run the CLI in a new process, online, against the stand-in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                        "HF_OIDC_RESOURCE", "CKPTINIT_DEBUG")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "ckptinit", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _no_token(proc) -> None:
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr


def test_push_uploads_the_folder_with_the_env_token_and_endpoint(hub, folder, tmp_path):
    proc = ckptinit(hub, tmp_path, "push", folder, "me/r18-init", "--private", "--revision",
                    "dev", "--commit-message", "ckptinit test upload", token=TOKEN)
    assert proc.returncode == 0, proc.stderr
    (commit,) = hub.commits
    assert re.fullmatch(rf"{hub.url}/me/r18-init/commit/[0-9a-f]{{40}}\n", proc.stdout)
    assert (commit.repo_id, commit.revision, commit.message) == (
        "me/r18-init", "dev", "ckptinit test upload")
    assert commit.authorization == f"Bearer {TOKEN}"  # HF_TOKEN from the environment
    assert commit.files == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert b'create_model("hf-hub:me/r18-init"' in commit.files["README.md"]
    assert hub.created[0]["visibility"] == "private" and hub.repos["me/r18-init"].private
    assert hub.pulls == []
    _no_token(proc)


def test_push_create_pr_with_the_token_option(hub, folder, tmp_path):
    hub.add_repo("me/shared")
    proc = ckptinit(hub, tmp_path, "push", folder, "me/shared", "--create-pr", "--token",
                    TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert [c.revision for c in hub.commits] == ["refs/pr/1"]
    assert "README.md" not in hub.files("me/shared")  # main is untouched until merged
    assert hub.created == [] and not hub.repos["me/shared"].private
    assert f"pull request: {hub.url}/me/shared/discussions/1" in proc.stderr
    assert proc.stdout.count("\n") == 1 and "/commit/" in proc.stdout
    _no_token(proc)


@pytest.mark.parametrize("token, contains", [
    (None, "Not logged in to the Hugging Face Hub: run `hf auth login`"),
    ("hf_not_a_valid_token_000", "rejected the token (401"),
])
def test_push_failures_are_one_line(hub, folder, tmp_path, token, contains):
    proc = ckptinit(hub, tmp_path, "push", folder, "me/x", token=token)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and contains in lines[-1]
    assert sum(line.startswith("Error:") for line in lines) == 1
    assert "Traceback" not in proc.stderr
    assert "hf_not_a_valid_token_000" not in proc.stderr
    assert hub.commits == []


def test_rescale_push_to_writes_then_uploads(hub, tmp_path):
    out = tmp_path / "init"
    proc = ckptinit(hub, tmp_path, "rescale", ARCH, "-o", out, "--push-to", "me/new",
                    "--license", "apache-2.0", "--token", TOKEN, "-q", *TINY)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == str(out) and lines[1].startswith(f"{hub.url}/me/new/commit/")
    (commit,) = hub.commits
    assert commit.files == {p.name: p.read_bytes() for p in out.iterdir()}
    card = commit.files["README.md"].decode()
    assert "license: apache-2.0" in card and 'create_model("hf-hub:me/new"' in card
    assert "--push-to me/new" in card and "--token" not in card
    assert all(TOKEN.encode() not in data for data in commit.files.values())
    _no_token(proc)


def test_rescale_push_to_a_repository_with_a_card_is_refused_before_any_work(hub, tmp_path):
    hub.add_repo("me/taken", {"README.md": b"# theirs\n"})
    proc = ckptinit(hub, tmp_path, "rescale", ARCH, "-o", tmp_path / "init", "--push-to",
                    "me/taken", *TINY, token=TOKEN)
    assert proc.returncode == 1
    assert "already has a model card" in proc.stderr and "--force" in proc.stderr
    assert not (tmp_path / "init").exists() and hub.commits == []


def test_token_reaches_hf_hub_sources(hub, built, tmp_path):
    """A private repository loads with --token (timm's own Hub loader takes none)."""
    hub.add_repo("me/private-init", {n: (built / n).read_bytes()
                                     for n in ("config.json", "model.safetensors")},
                 private=True)
    args = ["rescale", "hf-hub:me/private-init", "-o", tmp_path / "r.safetensors", "--report",
            tmp_path / "r.json", "--no-between", "-q", *TINY]
    proc = ckptinit(hub, tmp_path, *args)
    assert proc.returncode == 1 and "not found (or private)" in proc.stderr
    proc = ckptinit(hub, tmp_path, *args, "--token", TOKEN)
    assert proc.returncode == 0, proc.stderr
    source = json.loads((tmp_path / "r.json").read_text())["source"]
    assert (source["kind"], source["repo_id"], source["missing_count"]) == (
        "hf-hub", "me/private-init", 0)
    assert re.fullmatch("[0-9a-f]{40}", source["revision"])
    _no_token(proc)

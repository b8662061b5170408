"""Output test setup: a local stand-in for the Hub, reachable in this process, and a
folder to upload."""

from __future__ import annotations

import shutil

import pytest

from tests.hub_server import FakeHub

TOKEN = "hf_test_write_token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, with huggingface_hub online for this test only (HF_HUB_OFFLINE, set
    for the whole suite, blocks localhost too) and no login of the machine's own."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    with FakeHub({TOKEN: "me"}, orgs={"me": ["my-org"]}) as server:
        yield server


@pytest.fixture(scope="package")
def built_folder(tmp_path_factory):
    """A folder as `rescale -o FOLDER` writes it (made once; tests upload copies)."""
    import timm

    from ckptinit.output.folder import write_folder
    from tests.output.helpers import make_report

    out = tmp_path_factory.mktemp("built") / "r18"
    write_folder(out, model=timm.create_model("test_resnet", num_classes=10),
                 metadata={"architecture": "test_resnet"}, report=make_report(),
                 license="mit")
    return out


@pytest.fixture
def folder(built_folder, tmp_path):
    copy = tmp_path / "upload"
    shutil.copytree(built_folder, copy)
    return copy

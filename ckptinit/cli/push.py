"""`ckptinit push FOLDER REPO_ID`: upload a folder written by `rescale -o FOLDER` to the
Hugging Face Hub in one commit, and what `rescale --push-to` needs before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..options import PublishOptions
from .command_line import command_line
from .errors import cli_errors
from .options import ForceOpt, PrivateOpt, QuietOpt
from .ui import Ui

HUB = "Hub"

FolderArg = Annotated[Path, typer.Argument(
    metavar="FOLDER", show_default=False,
    help="A folder written by `ckptinit rescale SOURCE -o FOLDER` (or timm's save_for_hf).")]
RepoArg = Annotated[str, typer.Argument(
    metavar="REPO_ID", show_default=False,
    help="Model repository, e.g. your-name/resnet50-init (created when it does not exist).")]
BranchOpt = Annotated[str | None, typer.Option(
    "--revision", metavar="BRANCH", show_default=False, rich_help_panel=HUB,
    help="Branch to commit to (made from main when missing; default: main).")]
CreatePrOpt = Annotated[bool, typer.Option(
    "--create-pr", rich_help_panel=HUB, help="Open a pull request against main instead.")]
MessageOpt = Annotated[str | None, typer.Option(
    "--commit-message", metavar="TEXT", show_default=False, rich_help_panel=HUB,
    help="Commit message (default: 'Upload ARCH initialised by ckptinit VERSION').")]
HubTokenOpt = Annotated[str | None, typer.Option(
    "--token", metavar="TOKEN", envvar="HF_TOKEN", show_envvar=True, show_default=False,
    rich_help_panel=HUB, help="Hugging Face token with write access (default: the `hf auth "
    "login` token).")]


def push(
    folder: FolderArg,
    repo_id: RepoArg,
    *,
    private: PrivateOpt = False,
    revision: BranchOpt = None,
    create_pr: CreatePrOpt = False,
    commit_message: MessageOpt = None,
    token: HubTokenOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a folder to the Hugging Face Hub in one commit; print the commit URL.

    The endpoint follows HF_ENDPOINT and the token HF_TOKEN (or the login), as the `hf` CLI
    does. A model card already in the repository is only replaced with --force.
    """
    with cli_errors():
        ui = Ui(quiet)
        upload(ui, folder, repo_id, token=token, private=private, revision=revision,
               create_pr=create_pr, commit_message=commit_message, force=force)


def upload(ui: Ui, folder: Path, repo_id: str, *, url_on_stdout: bool = True,
           **kwargs) -> None:
    """Push; the commit URL is the result (stdout), a pull request's page goes to stderr.
    With the report as JSON on stdout, the URL goes to stderr too."""
    from ..output.push import push_folder

    if ui.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    result = push_folder(folder, repo_id, **kwargs)
    if result.pr_url:
        ui.console.print(f"pull request: {result.pr_url}", markup=False, highlight=False)
    if url_on_stdout:
        typer.echo(result.commit_url)
    else:
        ui.console.print(f"commit: {result.commit_url}", markup=False, highlight=False)


def publish_options(ctx: typer.Context, output: Path, push_to: str | None,
                    license: str | None, token: str | None, force: bool,
                    private: bool = False) -> PublishOptions:
    """What `rescale` tells the folder writer, checked before any work: --push-to and
    --license need a folder; with --push-to, the login and the repository's card."""
    from ..output.folder import check_folder, is_folder_output

    if private and not push_to:
        raise UsageError("--private applies to the repository of --push-to; add --push-to "
                         "REPO_ID (or use `ckptinit push FOLDER REPO_ID --private`).")
    if (push_to or license) and not is_folder_output(output):
        raise UsageError("--push-to and --license need -o FOLDER (a name without "
                         ".safetensors), which holds the config.json and model card.")
    if license is not None and (not license.strip() or any(c.isspace() for c in license)):
        raise UsageError(f"--license '{license}' is not a licence id (e.g. apache-2.0, mit, "
                         "cc-by-4.0, other).")
    repo_id = None
    if push_to:
        from ..output.push import check_push

        check_folder(output, force)
        repo_id = check_push(push_to, token=token, force=force)
    return PublishOptions(license=license, repo_id=repo_id, command_line=command_line(ctx))

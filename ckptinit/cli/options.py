"""The options of `rescale` and `measure`: one Annotated alias each, grouped in the help
panels Model, Calibration data, Method and Output, and the one conversion of their values
into the library's option objects (`stage_options`)."""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..options import (
    FRESH_DRAWS,
    LOADED_DRAWS,
    WEIGHT_DRAWS,
    CalibrationOptions,
    RescaleOptions,
    SourceOptions,
)
from .outputs import PLOT_SUFFIXES, check_side_file

log = logging.getLogger(__name__)

MODEL = "Model"
DATA = "Calibration data"
METHOD = "Method"
OUTPUT = "Output"


# --------------------------------------------------------------------------- model options
SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", show_default=False,
    help="A timm architecture (fresh weights), a checkpoint file (.safetensors, .pth, .pt, "
    ".bin), hf-hub:org/repo[@revision] or local-dir:PATH.")]
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", metavar="NAME", show_default=False, rich_help_panel=MODEL,
    help="timm architecture of a checkpoint file (default: config.json beside the file, "
    "ckptinit metadata, or the checkpoint's own 'arch' entry).")]
NumClassesOpt = Annotated[int | None, typer.Option(
    "--num-classes", metavar="N", min=0, show_default=False, rich_help_panel=MODEL,
    help="Classifier size (0: headless; a new size gets a fresh head).")]
ModelArgOpt = Annotated[list[str] | None, typer.Option(
    "--model-arg", metavar="KEY=VALUE", show_default=False, rich_help_panel=MODEL,
    help="Passed to timm.create_model; VALUE is a Python literal or a string (repeatable).")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", rich_help_panel=MODEL,
    help="Load pickles that need more than tensors (this runs code from the file: only for "
    "files you trust).")]
UseEmaOpt = Annotated[bool, typer.Option(
    "--use-ema", rich_help_panel=MODEL, help="Prefer the EMA weights of a training checkpoint.")]
StripPrefixOpt = Annotated[list[str] | None, typer.Option(
    "--strip-prefix", metavar="PREFIX", show_default=False, rich_help_panel=MODEL,
    help="Remove this key prefix, e.g. 'module.encoder_q.' (repeatable; common ones are "
    "found on their own).")]
KeyMapOpt = Annotated[list[str] | None, typer.Option(
    "--key-map", metavar="OLD=NEW", show_default=False, rich_help_panel=MODEL,
    help="Rename keys starting with OLD to start with NEW (repeatable; an empty OLD adds a "
    "prefix).")]

# --------------------------------------------------------------------------- data options
DataOpt = Annotated[str, typer.Option(
    "--data", metavar="SAMPLES|FOLDER|DATASET", rich_help_panel=DATA,
    help="'samples' (photos shipped with ckptinit, offline), an image folder or dataset "
    "files on disk, or a Hugging Face dataset id (streamed).")]
ImagesOpt = Annotated[int, typer.Option(
    "--images", metavar="N", min=1, rich_help_panel=DATA, help="Calibration images.")]
HoldoutOpt = Annotated[int, typer.Option(
    "--holdout", metavar="N", min=0, rich_help_panel=DATA,
    help="Extra images never used for fitting, for the function check.")]
SplitOpt = Annotated[str | None, typer.Option(
    "--split", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Dataset split (default: train, else the first one).")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Dataset configuration (subset) name.")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", metavar="REV", show_default=False, rich_help_panel=DATA,
    help="Dataset revision (branch, tag or commit).")]
ImageColumnOpt = Annotated[str | None, typer.Option(
    "--image-column", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Column holding the images (default: found from the dataset's features).")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", metavar="TOKEN", envvar="HF_TOKEN", show_envvar=True, show_default=False,
    rich_help_panel=DATA,
    help="Hugging Face token for gated or private datasets, hf-hub: models and --push-to "
    "(default: the `hf auth login` token).")]
ShuffleBufferOpt = Annotated[int, typer.Option(
    "--shuffle-buffer", metavar="N", min=1, rich_help_panel=DATA,
    help="Shuffle buffer of streamed datasets.")]
InputSizeOpt = Annotated[int | None, typer.Option(
    "--input-size", metavar="PIXELS", min=1, show_default=False, rich_help_panel=DATA,
    help="Square input size (default: the model's data config).")]
MeanOpt = Annotated[tuple[float, float, float] | None, typer.Option(
    "--mean", metavar="R G B", show_default=False, rich_help_panel=DATA,
    help="Normalisation mean (default: the model's data config).")]
StdOpt = Annotated[tuple[float, float, float] | None, typer.Option(
    "--std", metavar="R G B", show_default=False, rich_help_panel=DATA,
    help="Normalisation std (default: the model's data config).")]
CropPctOpt = Annotated[float | None, typer.Option(
    "--crop-pct", metavar="FRACTION", show_default=False, rich_help_panel=DATA,
    help="Center-crop fraction in (0, 1] (default: the model's data config).")]
InterpolationOpt = Annotated[str | None, typer.Option(
    "--interpolation", metavar="NAME", show_default=False, rich_help_panel=DATA,
    help="Resize filter: nearest, bilinear, bicubic, box, hamming, lanczos (default: the "
    "model's data config).")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", metavar="N", min=0, show_default=False, rich_help_panel=DATA,
    help="Image decoding threads (default: up to 8).")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", metavar="INT", rich_help_panel=DATA,
    help="Seed for image order, crops, weight draws and gradient draws.")]

# --------------------------------------------------------------------------- method options
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda", rich_help_panel=METHOD,
    help="Where to compute (auto: cuda when available).")]
MemoryFormatOpt = Annotated[str, typer.Option(
    "--memory-format", metavar="LAYOUT", rich_help_panel=METHOD, show_default=False,
    help="auto (default), channels-last or contiguous.")]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", metavar="N", min=1, rich_help_panel=METHOD,
    help="Images per forward pass.")]
GradBatchesOpt = Annotated[int | None, typer.Option(
    "--grad-batches", metavar="N", min=1, rich_help_panel=METHOD, show_default=False,
    help=f"Random loss draws per change-rate estimate [default: {FRESH_DRAWS} fresh, "
         f"{LOADED_DRAWS} loaded].")]
AllowChangeOpt = Annotated[bool, typer.Option(
    "--allow-function-change", rich_help_panel=METHOD,
    help="Let units move whose rescaling cannot be compensated (they are pinned otherwise).")]
OptimizerOpt = Annotated[str, typer.Option(
    "--optimizer", metavar="sgd|adam", rich_help_panel=METHOD,
    help="Whose relative step to equalise: SGD's ||dL/dW|| / ||W||, or Adam's lr / RMS(W).")]
ResidualInitOpt = Annotated[str, typer.Option(
    "--residual-init", metavar="data|timm", rich_help_panel=METHOD,
    help="Fresh zero-started residual branches: data gives each a share 1/sqrt(n), timm "
    "keeps them at zero.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel=OUTPUT, help="Nothing on stderr but errors.")]
PlotOpt = Annotated[Path | None, typer.Option(
    "--plot", metavar="FILE.png", show_default=False, rich_help_panel=OUTPUT,
    help="Plot the per-unit change rates (log scale).")]

# --------------------------------------------------------------------------- rescale only
WithinOpt = Annotated[bool | None, typer.Option(
    "--within/--no-within", show_default=False, rich_help_panel=METHOD,
    help="Within-layer step: draw (see --weights) and normalise every unit (default: only "
    "units without loaded weights).")]
BetweenOpt = Annotated[bool, typer.Option(
    "--between/--no-between", rich_help_panel=METHOD,
    help="Between-layer step: equalise the units' change rates.")]
WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", metavar="DRAW", show_default=False,
    rich_help_panel=METHOD,
    help=f"Weight draw for the units of the within-layer step: {', '.join(WEIGHT_DRAWS)} "
    "(default: gaussian for fresh units, keep for loaded ones).")]
BetaOpt = Annotated[float, typer.Option(
    "--beta", metavar="FLOAT", rich_help_panel=METHOD,
    help="Target mean of every unit's outputs (units with a bias).")]
PatchBudgetOpt = Annotated[int, typer.Option(
    "--patch-budget", metavar="N", min=1, rich_help_panel=METHOD,
    help="Input patches per unit for the pca and kmeans draws.")]
DampingOpt = Annotated[float, typer.Option(
    "--damping", metavar="ALPHA", rich_help_panel=METHOD,
    help="Step size alpha in (0, 1] of the between-layer update r = (C/Cbar)^(alpha/2).")]
HeadStdOpt = Annotated[float, typer.Option(
    "--head-std", metavar="STD", rich_help_panel=METHOD,
    help="Std of the model's outputs (its head) after the within-layer step.")]
TolOpt = Annotated[float, typer.Option(
    "--tol", metavar="FRACTION", rich_help_panel=METHOD,
    help="Tolerance of both steps: of each channel's correction per within-layer pass, "
    "and of each change rate against the target.")]
ItersOpt = Annotated[int, typer.Option(
    "--iters", metavar="N", min=0, rich_help_panel=METHOD,
    help="Most between-layer iterations.")]
FunctionTolOpt = Annotated[float, typer.Option(
    "--function-tol", metavar="FRACTION", min=0.0, rich_help_panel=METHOD,
    help="Largest relative change of the outputs on held-out images allowed for loaded "
    "weights; above it nothing is written.")]
OutputOpt = Annotated[Path, typer.Option(
    "--output", "-o", metavar="FILE.safetensors|FOLDER", show_default=False,
    rich_help_panel=OUTPUT, help="Output checkpoint, or a folder ready for the Hub "
    "(model.safetensors, config.json, README.md model card, JSON report, plots).")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", rich_help_panel=OUTPUT,
    help="Print per-unit plan and cost; write nothing.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", rich_help_panel=OUTPUT,
    help="Overwrite an existing output (a folder only if ckptinit wrote it; with --push-to, "
    "also the repository's model card).")]
PushToOpt = Annotated[str | None, typer.Option(
    "--push-to", metavar="REPO_ID", show_default=False, rich_help_panel=OUTPUT,
    help="Upload the output folder to this Hugging Face Hub model repository (see `ckptinit "
    "push`).")]
PrivateOpt = Annotated[bool, typer.Option(
    "--private", rich_help_panel=OUTPUT,
    help="Create the Hub repository as private (an existing one keeps its visibility).")]
LicenseOpt = Annotated[str | None, typer.Option(
    "--license", metavar="ID", show_default=False, rich_help_panel=OUTPUT,
    help="Licence of a folder's weights, a Hub licence id such as apache-2.0 (default: the "
    "source's licence from its config.json, none for a fresh architecture).")]

# --------------------------------------------------------------------------- rescale and measure
ReportOpt = Annotated[Path | None, typer.Option(
    "--report", metavar="FILE.json", show_default=False, rich_help_panel=OUTPUT,
    help="Write the per-unit report to this JSON file ('-': stdout, as --json).")]

# --------------------------------------------------------------------------- every command
JsonOpt = Annotated[bool, typer.Option(
    "--json", rich_help_panel=OUTPUT,
    help="Print the result as JSON on stdout (and nothing else there).")]


# --------------------------------------------------------------------------- values -> options

# The side files of the commands (parameter name -> option, suffixes), checked in this order.
SIDE_FILES = {
    "report": ("--report", (".json",)),
    "plot": ("--plot", PLOT_SUFFIXES),
}
# Data options that a kind of --data never reads (the CLI warns when they are given).
UNUSED_DATA_OPTIONS = {
    "samples": ("split", "config", "revision", "image_column", "shuffle_buffer"),
    "local": ("config", "revision", "shuffle_buffer"),
}


def stage_options(
    ctx: typer.Context,
) -> tuple[SourceOptions, CalibrationOptions, RescaleOptions]:
    """The one options object per stage, from the parameters of `rescale` or `measure`.

    Typer needs each option in the command's signature; its value is read back from
    `ctx.params`. Method options a command lacks keep their defaults. Bad values, an
    unknown device and unwritable side files are refused here, before any work; data
    options that the kind of --data never reads are named in a warning.
    """
    params = ctx.params
    method = RescaleOptions(
        **{f.name: params[f.name] for f in fields(RescaleOptions) if f.name in params})
    method.check()
    check_device(method.device)
    for name, (flag, suffixes) in SIDE_FILES.items():
        if name in params:
            check_side_file(_path(params[name]), flag, suffixes)
    given = {name for name in params if _given(ctx, name)}
    source = SourceOptions(
        arch=params["arch"], num_classes=params["num_classes"], token=params.get("token"),
        model_args=parse_model_args(params["model_arg"]), trust_pickle=params["trust_pickle"],
        use_ema=params["use_ema"], strip_prefix=list(params["strip_prefix"] or []),
        key_map=parse_key_map(params["key_map"]))
    calibration = CalibrationOptions(**{f.name: params[f.name] for f in fields(CalibrationOptions)})
    warn_unused_data_options(params["source"], calibration, given,
                             pushes=bool(params.get("push_to")))
    return source, calibration, method


def _given(ctx: typer.Context, name: str) -> bool:
    """The option was typed on the command line (not a default, not an environment value)."""
    found = ctx.get_parameter_source(name)
    return found is not None and found.name == "COMMANDLINE"


def warn_unused_data_options(source: str, options: CalibrationOptions, given: set[str],
                             pushes: bool = False) -> None:
    """One warning line naming the data options given that --data's kind never reads, and
    a --token that neither SOURCE, --data nor an upload (`pushes`) needs."""
    from ..sources.pretrained import HUB_PREFIXES

    data = options.data
    kind = "samples" if data == "samples" else "local" if Path(data).expanduser().exists() \
        else None
    unused = [name for name in UNUSED_DATA_OPTIONS.get(kind, ()) if name in given]
    on_hub = kind is None or pushes or source.startswith(HUB_PREFIXES)
    if "token" in given and not on_hub:
        unused.append("token")
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        what = "the shipped samples" if kind == "samples" else f"local data '{data}'"
        log.warning("%s not used with %s (they apply to Hugging Face Hub datasets)", flags,
                    what)


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def parse_model_args(items: Sequence[str] | None) -> dict:
    """KEY=VALUE pairs; values are Python literals when they parse as one, else strings."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg '{item}' is not KEY=VALUE (e.g. drop_rate=0.1).")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def parse_key_map(items: Sequence[str] | None) -> dict[str, str]:
    """OLD=NEW prefix renames; OLD may be empty (add a prefix), NEW may be empty (strip)."""
    out: dict[str, str] = {}
    for item in items or []:
        old, sep, new = item.partition("=")
        if not sep or not (old or new):
            raise UsageError(f"--key-map '{item}' is not OLD=NEW (e.g. trunk.=, or =backbone.).")
        out[old] = new
    return out


def check_device(device: str) -> None:
    base, _, index = device.partition(":")
    if base not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()) or (
            index and base != "cuda"):
        raise UsageError(f"Unknown --device '{device}'; use auto, cpu or cuda (or cuda:N).")

"""The command line: wiring, outputs, one-line errors, rendering. Tiny models and inputs."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from ckptinit import __version__
from ckptinit.cli import app
from ckptinit.cli.options import parse_key_map, parse_model_args
from ckptinit.errors import UsageError

ARCH = "test_resnet"  # timm's smallest ResNet: 16 units, ~0.5M parameters
TINY = ["--device", "cpu", "--input-size", "32", "--images", "8", "--holdout", "4",
        "--batch-size", "8", "--grad-batches", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    """The CLI configures the root logger and warnings capture; give other tests them back."""
    monkeypatch.delenv("CKPTINIT_DEBUG", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    filters = warnings.filters[:]
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    warnings.filters[:] = filters


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int | None = None, contains: str = "") -> str:
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # warnings may come first; the error is last
    err = lines[-1]
    assert err.startswith("Error: "), result.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1, result.stderr
    assert contains.lower() in err.lower(), err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One rescale of a fresh architecture, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("rescale")
    out, report, plot = root / "init.safetensors", root / "report.json", root / "rates.png"
    result = invoke("rescale", ARCH, "-o", out, "--report", report, "--plot", plot, *TINY)
    assert result.exit_code == 0, result.output
    return {"out": out, "report": report, "plot": plot, "result": result}


# --------------------------------------------------------------------------- help, entry points


@pytest.mark.parametrize("command", [[], ["rescale"], ["measure"], ["info"]])
def test_help_exits_zero(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_rescale_help_lists_the_option_groups():
    result = CliRunner().invoke(app, ["rescale", "--help"], env={"COLUMNS": "200"})
    for text in ("Model", "Calibration data", "Method", "Output", "--grad-batches",
                 "--strip-prefix", "--key-map", "--mean", "--patch-budget", "--function-tol",
                 "HF_TOKEN"):
        assert text in result.output, text


def _script() -> Path | None:
    exe = Path(sys.executable).parent / ("ckptinit.exe" if os.name == "nt" else "ckptinit")
    return exe if exe.exists() else None


def test_console_script_help_is_fast_and_imports_no_torch():
    script = _script()
    cmd = [str(script), "--help"] if script else [sys.executable, "-m", "ckptinit", "--help"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "rescale" in proc.stdout and "measure" in proc.stdout and "info" in proc.stdout
    assert elapsed < 5, f"--help took {elapsed:.1f}s"
    probe = ("import sys, ckptinit.cli; heavy = [m for m in ('torch', 'timm', 'safetensors', "
             "'matplotlib', 'datasets') if m in sys.modules]; print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at CLI import time: {proc.stdout}"


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "ckptinit", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "rescale" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ckptinit", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == f"ckptinit {__version__}"


# --------------------------------------------------------------------------- rescale


def test_rescale_writes_a_checkpoint_timm_loads_strictly(run):
    assert run["result"].stdout.strip() == str(run["out"])
    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(load_file(run["out"]), strict=True)
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 1000)
    assert torch.isfinite(y).all()


def test_rescale_metadata_round_trip(run):
    with safe_open(str(run["out"]), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["ckptinit_version"] == __version__
    assert meta["architecture"] == ARCH
    assert meta["source"] == ARCH
    assert meta["seed"] == "0"
    assert "within" in meta["method"] and "between" in meta["method"]
    assert meta["data_source"] == "samples"
    assert meta["data_images"] == "8"
    assert meta["data_holdout"] == "4"
    assert json.loads(meta["data_transform"])["input_size"] == [3, 32, 32]
    assert json.loads(meta["options"])["grad_batches"] == 1


def test_rescale_report_has_one_entry_per_unit(run):
    report = json.loads(run["report"].read_text())
    model = timm.create_model(ARCH, pretrained=False)
    units = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [u["name"] for u in report["units"]] == units
    assert report["source"]["architecture"] == ARCH
    assert all(u["std_after"] is not None for u in report["units"])
    assert run["plot"].read_bytes()[:8] == PNG_MAGIC


def test_rescale_prints_the_table_and_summary_on_stderr(run):
    err = run["result"].stderr
    for name in ("conv1.0", "layer1.0.conv1", "layer4.0.downsample.1", "fc"):
        assert name in err
    assert "Summary:" in err
    assert f"source: {ARCH}, fresh weights" in err
    assert "Traceback" not in err
    assert run["result"].stdout.strip() == str(run["out"])  # results only on stdout


def test_existing_output_is_refused_then_overwritten_with_force(tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"precious")
    result = invoke("rescale", ARCH, "-o", out, *TINY)
    assert_one_line_error(result, contains="--force")
    assert out.read_bytes() == b"precious"
    result = invoke("rescale", ARCH, "-o", out, "--force", "--quiet", "--no-between", *TINY)
    assert result.exit_code == 0, result.output
    assert load_file(out)  # a real checkpoint now
    assert result.stderr == ""
    assert result.stdout.strip() == str(out)


def test_quiet_prints_nothing_on_stderr(tmp_path):
    out = tmp_path / "q.safetensors"
    result = invoke("rescale", ARCH, "-o", out, "-q", "--no-between", *TINY)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.strip() == str(out)


def test_options_reach_the_library(tmp_path):
    """Method, source and data options end up in the report and the metadata."""
    out, report = tmp_path / "o.safetensors", tmp_path / "o.json"
    result = invoke("rescale", ARCH, "-o", out, "--report", report, "-q", "--weights",
                    "orthogonal", "--beta", "0.2", "--iters", "0", "--tol", "0.5",
                    "--damping", "0.5", "--function-tol", "1e-3", "--patch-budget", "1000",
                    "--num-classes", "7", "--model-arg", "drop_rate=0.1", "--mean", "0.4",
                    "0.4", "0.4", "--std", "0.2", "0.2", "0.2", "--crop-pct", "1.0",
                    "--interpolation", "bilinear", "--workers", "0", "--seed", "3", *TINY)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    opts = data["options"]
    assert (opts["weights"], opts["beta"], opts["iters"], opts["tol"], opts["damping"]) == (
        "orthogonal", 0.2, 0, 0.5, 0.5)
    assert (opts["function_tol"], opts["patch_budget"], opts["seed"]) == (1e-3, 1000, 3)
    assert {u["draw"] for u in data["units"]} == {"orthogonal"}
    transform = data["data"]["transform"]
    assert transform["mean"] == [0.4] * 3 and transform["std"] == [0.2] * 3
    assert transform["crop_pct"] == 1.0 and transform["interpolation"] == "bilinear"
    assert data["source"]["num_classes"] == 7
    assert data["source"]["model_args"] == {"drop_rate": 0.1}
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("fc.weight").get_shape() == [7, 96]
        assert f.metadata()["seed"] == "3"


def test_rescale_of_a_checkpoint_file(run, tmp_path):
    """A file written by ckptinit knows its architecture; a new head gets the within step."""
    out, report = tmp_path / "ft.safetensors", tmp_path / "ft.json"
    result = invoke("rescale", run["out"], "--num-classes", "10", "-o", out, "--report",
                    report, *TINY)
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())
    assert "from ckptinit metadata" in err and "tensors loaded" in err
    assert "missing, left fresh (fc.weight, fc.bias)" in err
    units = {u["name"]: u for u in json.loads(report.read_text())["units"]}
    assert units["fc"]["action"] != "none"
    assert units["conv1.0"]["action"] == "none"
    assert load_file(out)["fc.weight"].shape == (10, 96)


def test_source_options_reach_the_loader(tmp_path):
    """--arch, --use-ema, --strip-prefix and --key-map on training-checkpoint layouts."""
    torch.manual_seed(0)
    sd = timm.create_model(ARCH).state_dict()
    ema = tmp_path / "ema.pth"
    torch.save({"model": {f"zz.{k}": v + 1 for k, v in sd.items()},
                "model_ema": {f"zz.{k}": v for k, v in sd.items()}}, ema)
    renamed = tmp_path / "renamed.pth"
    torch.save({f"xx.{k}": v for k, v in sd.items()}, renamed)
    cases = [
        (ema, ["--use-ema", "--strip-prefix", "zz."], "model_ema", ["zz."], {}),
        (renamed, ["--key-map", "xx.="], None, [], {"xx.": ""}),
    ]
    for path, extra, nested, stripped, key_map in cases:
        out, report = tmp_path / f"{path.stem}.safetensors", tmp_path / f"{path.stem}.json"
        result = invoke("rescale", path, "--arch", ARCH, *extra, "-o", out, "--report", report,
                        "-q", "--no-between", *TINY)
        assert result.exit_code == 0, result.output
        source = json.loads(report.read_text())["source"]
        assert source["arch_from"] == "option"
        assert (source["nested_key"], source["stripped_prefixes"], source["key_map"]) == (
            nested, stripped, key_map)
        assert source["missing_count"] == 0 and source["dropped_count"] == 0


# --------------------------------------------------------------------------- errors


def test_unknown_architecture_suggests_close_names(tmp_path):
    out = tmp_path / "x.safetensors"
    err = assert_one_line_error(invoke("rescale", "resnet181", "-o", out, *TINY))
    assert "resnet18" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_data_folder(tmp_path):
    out = tmp_path / "x.safetensors"
    assert_one_line_error(invoke("rescale", ARCH, "-o", out, "--data", tmp_path / "nope", *TINY),
                          contains="nope")
    assert not out.exists()


def test_folder_without_a_readable_image(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    (data / "notes.txt").write_text("hello")
    out = tmp_path / "x.safetensors"
    assert_one_line_error(invoke("rescale", ARCH, "-o", out, "--data", data, *TINY))
    assert not out.exists()


def test_output_folder_missing_or_not_a_folder(tmp_path):
    out = tmp_path / "missing" / "x.safetensors"
    assert_one_line_error(invoke("rescale", ARCH, "-o", out, *TINY), contains="does not exist")
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "x.safetensors"
    assert_one_line_error(invoke("rescale", ARCH, "-o", out, *TINY))
    assert not out.parent.is_dir()


def test_unwritable_output_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.name == "nt" or os.geteuid() == 0:  # root writes anywhere: pretend it cannot
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder
                            else real_access(p, mode, **kw))
    try:
        assert_one_line_error(invoke("rescale", ARCH, "-o", folder / "x.safetensors", *TINY),
                              contains="not writable")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("args, code, contains", [
    (["--model-arg", "drop_rate"], 2, "KEY=VALUE"),
    (["--model-arg", "not_an_argument=1"], 1, "not_an_argument"),
    (["--key-map", "trunk."], 2, "OLD=NEW"),
    (["--weights", "kmean"], 2, "kmeans"),
    (["--weights", "kmeans", "--no-within"], 2, "--no-within"),
    (["--device", "gpu"], 2, "--device"),
    (["--damping", "0"], 2, "--damping"),
    (["--interpolation", "cubic"], 2, "--interpolation"),
    (["--report", "{tmp}/r.txt"], 2, ".json"),
    (["--plot", "{tmp}/missing/p.png"], 2, "does not exist"),
])
def test_bad_options_are_one_line_usage_errors(tmp_path, args, code, contains):
    out = tmp_path / "x.safetensors"
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_error(invoke("rescale", ARCH, "-o", out, *TINY, *args), code, contains)
    assert not out.exists()


def test_unexpected_errors_are_one_line_too(tmp_path, monkeypatch):
    import ckptinit.api

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(ckptinit.api, "rescale_checkpoint", boom)
    err = assert_one_line_error(invoke("rescale", ARCH, "-o", tmp_path / "x.safetensors"))
    assert "RuntimeError: something broke" in err and "CKPTINIT_DEBUG" in err


def test_parse_helpers():
    assert parse_model_args(["drop_rate=0.1", "act_layer=gelu", "depths=(1, 2)"]) == {
        "drop_rate": 0.1, "act_layer": "gelu", "depths": (1, 2)}
    assert parse_key_map(["trunk.=", "=backbone.", "a.=b."]) == {
        "trunk.": "", "": "backbone.", "a.": "b."}
    for bad in (["=1"], ["1x=2"], ["novalue"]):
        with pytest.raises(UsageError):
            parse_model_args(bad)
    with pytest.raises(UsageError):
        parse_key_map(["="])


# --------------------------------------------------------------------------- measure, info


def test_measure_writes_json_and_png_and_nothing_else(tmp_path):
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    result = invoke("measure", ARCH, "--json", js, "--plot", png, *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.png"]
    assert result.stdout.split() == [str(js), str(png)]
    data = json.loads(js.read_text())
    assert data["command"] == "measure"
    assert len(data["units"]) == 16
    assert all(u["rate_before"] is not None for u in data["units"])
    assert all(u["mean_after"] is None for u in data["units"])  # nothing was changed
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "conv1.0" in result.stderr and "Summary:" in result.stderr


def test_info_shows_the_provenance(run):
    result = invoke("info", run["out"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("safetensors", ARCH, "ckptinit metadata", "ckptinit provenance",
                     __version__, "within(", "samples", "seed", "format", "pt"):
        assert expected in text, expected
    assert result.stderr == ""

    result = invoke("info", run["out"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "safetensors"
    assert info["architecture"] == ARCH and info["arch_from"] == "metadata"
    assert info["provenance"]["ckptinit_version"] == __version__
    assert info["tensor_count"] == len(load_file(run["out"]))


def test_info_on_a_pickle_and_on_a_missing_file(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)},
                "epoch": 3}, path)
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    assert "pickle" in result.stdout and "unknown" in result.stdout and "epoch" in result.stdout
    assert_one_line_error(invoke("info", tmp_path / "nope.safetensors"))


# --------------------------------------------------------------------------- rendering


def _fake_report(n: int = 300):
    from ckptinit.report import FunctionCheck, RunReport, UnitRecord

    units = []
    for i in range(n):
        u = UnitRecord(name=f"stages.{i // 50}.blocks.{i % 50}.mlp.fc{i % 2 + 1}",
                       kind="Linear", shape=(384, 96), action="gaussian+normalize",
                       draw="gaussian", mean_before=1.5, std_before=12.0, mean_after=0.1,
                       std_after=1.0, scale=0.08, rate_before=10.0 ** (i % 5),
                       rate_after=20.0, r=1.7, between_status="ok",
                       compensation=f"batchnorm stages.{i // 50}.blocks.{i % 50}.norm")
        units.append(u)
    units[3].between_status, units[3].between_reason = "pinned", "output goes through gelu"
    return RunReport(version=__version__, command="rescale", units=units,
                     source={"source": "x", "architecture": "x"}, between_iterations=1,
                     converged=True, function_check=FunctionCheck(1e-6, 1e-4, True, 16))


@pytest.mark.parametrize("width", [80, 120, 160])
def test_table_keeps_names_whole_at_any_width(width):
    from io import StringIO

    from rich.console import Console

    from ckptinit.cli.render import print_report

    report = _fake_report()
    buf = StringIO()
    print_report(report, Console(file=buf, width=width, force_terminal=False))
    text = buf.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    names = {m for line in lines for m in re.findall(r"(?<!\S)(stages\.\S+)(?!\S)", line)}
    assert names == {u.name for u in report.units}  # never wrapped or cut
    assert sum(1 for line in lines if ".mlp.fc" in line) == len(report.units)  # one row each
    assert "Summary:" in text and "1 pinned" in " ".join(text.split())
    if width == 160:
        assert "rate" in text and "compensation" in text and "columns left out" not in text
    if width == 80:
        assert "columns left out" in text


def test_number_format():
    from ckptinit.cli.render import fmt_num

    assert [fmt_num(x) for x in (None, 0.0, 1.0, 0.05812, 167.2, 2830.4, 2.13e-5, 1.07e6)] == [
        "-", "0", "1", "0.0581", "167", "2.83e3", "2.13e-5", "1.07e6"]

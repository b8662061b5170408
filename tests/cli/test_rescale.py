"""`ckptinit rescale`: outputs, options reaching the library, one-line errors."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ckptinit import __version__
from tests.cli.helpers import ARCH, PNG_MAGIC, TINY, assert_one_line_error, invoke


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


def test_a_json_report_on_stdout_instead_of_the_path(tmp_path):
    out = tmp_path / "o.safetensors"
    result = invoke("rescale", ARCH, "-o", out, "--json", "-q", "--no-between", *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["command"] == "rescale" and out.exists()


def test_data_options_that_the_data_never_reads_are_named(tmp_path):
    result = invoke("rescale", ARCH, "-o", tmp_path / "o.safetensors", "--no-between",
                    "--revision", "v2", "--shuffle-buffer", "10", "--token", "hf_x", *TINY)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stderr.splitlines() if "not used with" in line)
    assert "--revision, --shuffle-buffer, --token" in line and "shipped samples" in line


def test_a_token_from_the_environment_is_not_warned_about(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    result = invoke("rescale", ARCH, "-o", tmp_path / "o.safetensors", "--no-between", *TINY)
    assert result.exit_code == 0, result.output
    assert "not used with" not in result.stderr


@pytest.mark.parametrize("args, code, contains", [
    (["--model-arg", "drop_rate"], 2, "KEY=VALUE"),
    (["--model-arg", "not_an_argument=1"], 2, "not_an_argument"),
    (["--key-map", "trunk."], 2, "OLD=NEW"),
    (["--weights", "kmean"], 2, "kmeans"),
    (["--weights", "kmeans", "--no-within"], 2, "--no-within"),
    (["--device", "gpu"], 2, "--device"),
    (["--damping", "0"], 2, "--damping"),
    (["--interpolation", "cubic"], 2, "--interpolation"),
    (["--report", "{tmp}/r.txt"], 2, ".json"),
    (["--plot", "{tmp}/missing/p.png"], 1, "does not exist"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, code, contains):
    out = tmp_path / "x.safetensors"
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_error(invoke("rescale", ARCH, "-o", out, *TINY, *args), code, contains)
    assert not out.exists()


def test_unexpected_errors_are_one_line_too(tmp_path, monkeypatch):
    import ckptinit.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(ckptinit.pipeline, "rescale_checkpoint", boom)
    err = assert_one_line_error(invoke("rescale", ARCH, "-o", tmp_path / "x.safetensors"))
    assert "RuntimeError: something broke" in err and "CKPTINIT_DEBUG" in err


def test_batches_smaller_than_the_probe_work(tmp_path):
    """The probes (scan, trace) take 4 images; batches of 2 used to crash them."""
    out = tmp_path / "o.safetensors"
    result = invoke("rescale", ARCH, "--images", "4", "--holdout", "2", "--batch-size", "2",
                    "--input-size", "32", "--iters", "1", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    timm.create_model(ARCH, pretrained=False).load_state_dict(load_file(out))


def test_a_batch_of_one_on_batchnorm_is_one_line(tmp_path):
    out = tmp_path / "o.safetensors"
    err = assert_one_line_error(invoke("rescale", ARCH, "--images", "2", "--holdout", "1",
                                       "--batch-size", "1", "--input-size", "32", "-o", out))
    assert "--batch-size 2" in err and not out.exists()

"""Several processes (torchrun, gloo on the CPU): the same checkpoint as one process on the
same images, each rank decoding only its share of them, rank 0 alone reports and writes,
and a failing rank stops every rank with one message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptinit.data.readers import open_source
from ckptinit.options import CalibrationOptions
from tests.cli.helpers import ARCH, invoke
from tests.data.helpers import photo, png_bytes

ROOT = Path(__file__).resolve().parents[1]
# 5 batches of 4 (three on rank 0, two on rank 1), three gradient draws (two on rank 0)
ARGS = ["--device", "cpu", "--input-size", "32", "--images", "20", "--holdout", "4",
        "--batch-size", "4", "--grad-batches", "3"]
# 9 batches of 4 (five on rank 0, four on rank 1) and 2 held-out images: a rank decodes
# the images of its batches (and of its gradient draws), the first 4 and the holdout
SHARD_ARGS = ["--device", "cpu", "--input-size", "32", "--images", "36", "--holdout", "2",
              "--batch-size", "4", "--grad-batches", "3"]
RTOL = 1e-5


def torchrun(nproc: int, *args: str | Path, module: str = "ckptinit", cwd: Path = ROOT,
             timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """`torchrun --standalone --nproc-per-node N -m MODULE ARGS` with this worktree first
    on the path; returns the finished process and its wall time."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("CKPTINIT_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", module, *map(str, args)]
    t0 = time.monotonic()
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # torchrun and every rank it started
            out, err = p.communicate()
            pytest.fail(f"torchrun still running after {timeout} s: {err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), time.monotonic() - t0


def tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_checkpoint(one: Path, many: Path) -> None:
    a, meta_a = tensors(one)
    b, meta_b = tensors(many)
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        # a floor for tensors that are zero up to rounding (the running mean after a
        # bias-free conv normalised to mean 0 holds values of about 1e-8)
        scale = y.abs().max().clamp_min(1e-6) if y.numel() else 1.0
        diff = float((x - y).abs().max() / scale) if y.numel() else 0.0
        assert diff <= RTOL, f"{key}: relative difference {diff:.2e}"
    assert meta_a == meta_b


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


def test_two_processes_write_the_checkpoint_of_one(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    result = invoke("rescale", ARCH, *ARGS, "-o", one, "--json")
    assert result.exit_code == 0, result.output
    assert '"within_passes"' in result.stdout and '"between_iterations": 1' in result.stdout
    proc, _ = torchrun(2, "rescale", ARCH, *ARGS, "-o", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_checkpoint(one, two)
    assert proc.stdout.strip() == str(two)  # rank 0 alone reports (stdout: the path, once)
    assert proc.stderr.count("between-layer:") == 1, proc.stderr[-3000:]
    assert "2 processes (torchrun)" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--weights", "kmeans"], ["--weights", "pca"]])
def test_three_processes_on_a_loaded_checkpoint_with_data_draws(tmp_path, extra):
    """A checkpoint as source, every unit redrawn from its input patches, 5 batches (2, 2
    and 1 per rank) and 4 gradient draws."""
    start = tmp_path / "start.safetensors"
    assert invoke("rescale", ARCH, *ARGS, "-o", start, "--no-between").exit_code == 0
    args = [*ARGS, "--grad-batches", "4", "--within", *extra]
    one, three = tmp_path / "one.safetensors", tmp_path / "three.safetensors"
    result = invoke("rescale", start, *args, "-o", one)
    assert result.exit_code == 0, result.output
    proc, _ = torchrun(3, "rescale", start, *args, "-o", three)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_checkpoint(one, three)


def test_a_failing_rank_stops_every_rank_with_one_message(tmp_path):
    out = tmp_path / "out.safetensors"
    proc, seconds = torchrun(2, "fail", "rescale", ARCH, *ARGS, "-o", out,
                             module="tests.distributed_child", timeout=120)
    assert proc.returncode != 0
    assert seconds < 60
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("Error: rank 1 of 2: unexpected OSError"), lines
    assert "Input/output error" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_rank_failing_while_it_reads_its_images_is_the_one_that_reports(tmp_path):
    """The data stage's collectives sit inside the pipeline's `together`: the failing rank,
    not the first one, must still print the message."""
    out = tmp_path / "out.safetensors"
    proc, seconds = torchrun(2, "full-disk", "rescale", ARCH, *ARGS, "-o", out,
                             module="tests.distributed_child", timeout=120)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("Error: rank 1 of 2: Cannot write the calibration spool"), lines
    assert not out.exists()


def test_an_error_every_rank_meets_is_reported_once(tmp_path):
    proc, seconds = torchrun(2, "rescale", ARCH, *ARGS, "--data", tmp_path / "missing",
                             "-o", tmp_path / "out.safetensors", timeout=120)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("Error: rank 0 of 2: ") and "missing" in lines[0], lines


def test_ranks_that_read_other_images_refuse(tmp_path):
    """Rank 1 runs in another directory, where the relative --data holds other photos."""
    for where, seed in (("here", 0), ("there", 1)):
        (tmp_path / where / "imgs").mkdir(parents=True)
        for i in range(3):
            photo(seed * 9 + i).save(tmp_path / where / "imgs" / f"{i}.png")
    out = tmp_path / "out.safetensors"
    proc, _ = torchrun(2, tmp_path / "there", "rescale", ARCH, *ARGS, "--data", "imgs",
                       "-o", out, module="tests.distributed_child", cwd=tmp_path / "here",
                       timeout=120)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("Error: rank 1 of 2: Rank 1 read other calibration images"), lines
    assert not out.exists()


def counted_opens(monkeypatch) -> list[str]:
    """Every image this process opens from now on (PIL's Image.open), as in
    tests/distributed_child.py's count mode."""
    from PIL import Image

    real, opened = Image.open, []

    def counting(fp, *args, **kwargs):
        opened.append(str(fp) if isinstance(fp, (str, os.PathLike)) else "<bytes>")
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def rank_opens(folder: Path) -> list[list[str]]:
    return [(folder / f"rank{r}.txt").read_text().split() for r in (0, 1)]


def run_both(tmp_path: Path, monkeypatch, args: list) -> tuple[list[str], list[list[str]]]:
    """One process in this one, then two under torchrun (counting the images each opens):
    the same checkpoint, header and data report."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    opened = counted_opens(monkeypatch)
    result = invoke("rescale", ARCH, *args, "-o", one, "--report", tmp_path / "one.json")
    assert result.exit_code == 0, result.output
    monkeypatch.undo()
    counts = tmp_path / "counts"
    counts.mkdir()
    proc, _ = torchrun(2, f"count={counts}", "rescale", ARCH, *args, "-o", two,
                       "--report", tmp_path / "two.json", module="tests.distributed_child")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_checkpoint(one, two)
    alone, split = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert alone["data"] == split["data"]  # counts, skips, notes: those of one process
    assert any("decoding only their images" in note for note in split["notes"])
    return opened, rank_opens(counts)


def test_two_processes_decode_their_share_of_a_folder_with_corrupt_images(tmp_path,
                                                                         monkeypatch):
    """Corrupt images early in the reading order shift every later image's index (and
    batch), so the ranks must agree on the skips to put each image where one process does."""
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(44):
        photo(i, size=(40, 36)).save(data / f"{i:02d}.png")
    order = [c.label for c in open_source(CalibrationOptions(data=str(data)), 44).candidates]
    for k in (1, 6, 17):  # the 2nd, 7th and 18th image read
        (data / order[k]).write_bytes(b"not an image")
    opened, ranks = run_both(tmp_path, monkeypatch, [*SHARD_ARGS, "--data", data])
    read = order[:41]  # 38 usable, 3 skipped
    assert set(read) <= {Path(p).name for p in opened}  # (one process decodes a few ahead)
    per_rank = [[Path(p).name for p in r if Path(p).parent == data] for r in ranks]
    assert set(per_rank[0]) | set(per_rank[1]) == set(read)  # every image, on some rank
    for decoded in per_rank:  # each rank: about half of one process's 41
        assert len(decoded) <= 0.7 * len(read), (len(decoded), len(read))


def test_two_processes_split_a_streamed_dataset_by_position(tmp_path, monkeypatch):
    """An arrow shard is streamed like a Hub dataset (shuffle buffer, take): the ranks
    iterate the same stream and each decodes its positions."""
    import datasets

    rows = [{"bytes": png_bytes(photo(i, size=(40, 36))), "path": None} for i in range(30)]
    for k in (2, 11):
        rows[k] = {"bytes": b"not an image", "path": None}
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": rows}).cast_column(
        "image", datasets.Image()).save_to_disk(str(saved))
    shard = tmp_path / "data.arrow"
    shutil.copy(next(saved.glob("*.arrow")), shard)
    _, ranks = run_both(tmp_path, monkeypatch, [*ARGS, "--data", shard])
    alone = json.loads((tmp_path / "one.json").read_text())["data"]
    assert alone["skipped"] == 2 and alone["kind"] == "arrow"
    read = alone["num_images"] + alone["num_holdout"] + alone["skipped"]
    assert sum(map(len, ranks)) >= read  # every image, on some rank
    for decoded in ranks:  # each: its 8 or 12 images, the first 4 and the 4 held out
        assert len(decoded) <= 0.75 * read, (len(decoded), read)

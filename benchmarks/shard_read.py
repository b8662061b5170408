"""Reading under torchrun (issue 13): how many images each rank decodes, against one
process, on an image folder with damaged files, and whether the checkpoint is still one
process's. Decode counts, not times: they do not depend on the shared machine's load.

    .venv/bin/python benchmarks/shard_read.py --images 256 --batch-size 16 --nproc 2 4

Each run is `tests/distributed_child.py count=DIR` (ckptinit unchanged, every call of
PIL's Image.open counted per rank); one process runs the same way without torchrun.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_folder(folder: Path, count: int, bad_every: int) -> int:
    """`count` 64x56 photos; every `bad_every`-th in the seeded reading order is damaged."""
    import numpy as np
    from PIL import Image

    from ckptinit.data.readers import open_source
    from ckptinit.options import CalibrationOptions

    folder.mkdir()
    for i in range(count):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 56), Image.Resampling.BILINEAR).save(
            folder / f"{i:05d}.png")
    order = [c.label for c in open_source(CalibrationOptions(data=str(folder)), count)
             .candidates]
    bad = order[bad_every - 1 :: bad_every]
    for name in bad:
        (folder / name).write_bytes(b"damaged")
    return len(bad)


def run(nproc: int, args: list[str], counts: Path, out: Path) -> list[int]:
    counts.mkdir()
    child = ["-m", "tests.distributed_child", f"count={counts}", "rescale", "resnet18", *args,
             "-o", str(out), "-q"]
    cmd = [sys.executable, *child] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", *child]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return [len((counts / f"rank{r}.txt").read_text().split()) for r in range(nproc)]


def max_rel_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    worst = 0.0
    for key, t in x.items():
        if t.numel():
            u, v = t.double(), y[key].double()
            worst = max(worst, float((u - v).abs().max() / v.abs().max().clamp_min(1e-6)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--holdout", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bad-every", type=int, default=25)
    p.add_argument("--nproc", type=int, nargs="+", default=[2])
    a = p.parse_args()
    random.seed(0)
    with tempfile.TemporaryDirectory(prefix="ckptinit-shard-read-") as tmp:
        tmp = Path(tmp)
        total = a.images + a.holdout
        files = total + total // (a.bad_every - 1) + 2
        bad = make_folder(tmp / "imgs", files, a.bad_every)
        args = ["--data", str(tmp / "imgs"), "--device", "cpu", "--input-size", "32",
                "--images", str(a.images), "--holdout", str(a.holdout),
                "--batch-size", str(a.batch_size)]
        one = run(1, args, tmp / "c1", tmp / "one.safetensors")[0]
        print(f"{files} files ({bad} damaged); {a.images} + {a.holdout} images, batches of "
              f"{a.batch_size}")
        print("| processes | decodes per rank | largest / one process's | max rel. diff |")
        print("|---|---|---|---|")
        print(f"| 1 | {one} | 1 | - |")
        for n in a.nproc:
            per = run(n, args, tmp / f"c{n}", tmp / f"n{n}.safetensors")
            diff = max_rel_diff(tmp / "one.safetensors", tmp / f"n{n}.safetensors")
            print(f"| {n} | {', '.join(map(str, per))} | {max(per) / one:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()

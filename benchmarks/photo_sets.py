"""Does the change-rate spread carry over to photos the step never saw? A cross check.

The shipped sample photos are split in two sets, A (every other photo, 7) and B (the
other 6). `ckptinit rescale ARCH --data <set>` runs on A, on B and on all 13 (the CLI, a
subprocess, default settings, 64 calibration images), and each written checkpoint is
measured by `archs.py`'s own code on 32 crops of A and 32 crops of B, with two seeds of
gradient draws: the spread over the movable units (max/min change rate) and the output
std in eval mode. The diagonal (calibrated and checked on one set, other crops) against
the off-diagonal (checked on the other set) separates what the step gets right on its
calibration distribution from what changes with the images.

    .venv/bin/python benchmarks/photo_sets.py --archs vit_tiny_patch16_224 convnext_atto \
        --json benchmarks/results/archs/photo-sets.json

With `--tiles` every photo is cut into its four quadrants (disjoint pixels) and one
quadrant per photo is held out (quadrant i % 4 of photo i). The step calibrates on the
other quadrants: 1 or 3 per photo of A ("A1", "A3": 7 or 21 tiles) or of all 13 ("all1",
"all3": 13 or 39), and the checks are crops of the held-out quadrants of A ("tA") and of B
("tB"). A3 against tA is unseen pixels of photos it saw; A3 against tB is photos it never
saw; all1 against all3 is 13 against 39 distinct calibration tiles of the same photos.

    .venv/bin/python benchmarks/photo_sets.py --tiles --archs vit_tiny_patch16_224 \
        convnext_atto --json benchmarks/results/archs/photo-tiles.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archs  # noqa: E402  (the measuring code, shared with archs.py, not with ckptinit)

ROOT = Path(__file__).resolve().parent.parent


def calibrate(arch: str, photos: list[Path], tmp: Path, tag: str,
              source: list[str] | None = None, seed: int = 0) -> tuple[Path, dict, float]:
    """`ckptinit rescale` (default settings, 64 images, `--seed seed`) on a folder of
    `photos`; `source` replaces the fresh ARCH (a checkpoint and its --arch)."""
    folder = tmp / f"{arch}-{tag}"
    folder.mkdir()
    for p in photos:
        (folder / p.name).symlink_to(p)
    out, rep = tmp / f"{arch}-{tag}.safetensors", tmp / f"{arch}-{tag}.json"
    code, secs, last = archs.ckptinit(
        [*(source or [arch]), "--data", str(folder), "--images", "64", "--seed", str(seed),
         "--device", "cpu", "-o", str(out), "--report", str(rep)],
        dict(os.environ, PYTHONPATH=str(ROOT)))
    if code != 0:
        raise SystemExit(f"{arch} on set {tag}: exit {code}: {last}")
    return out, json.loads(rep.read_text()), secs


def quadrant_boxes(img: Image.Image) -> list[tuple[int, int, int, int]]:
    """The four quadrants of an image (disjoint pixels), as PIL crop boxes."""
    w, h = img.size
    return [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2),
            (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]


def quadrants(paths: list[Path], folder: Path) -> tuple[dict, dict]:
    """(calibration tile paths, held-out tile images) per set, as in the docstring."""
    folder.mkdir()
    cal = {"A1": [], "A3": [], "all1": [], "all3": []}
    held = {"tA": [], "tB": []}
    for i, p in enumerate(paths):
        img = Image.open(p).convert("RGB")
        boxes = quadrant_boxes(img)
        held["tA" if i % 2 == 0 else "tB"].append(img.crop(boxes[i % 4]))
        for j in range(1, 4):
            q = (i + j) % 4
            tile = folder / f"{p.stem}-q{q}.png"
            img.crop(boxes[q]).save(tile)
            sets = ["all3"] + (["all1"] if j == 1 else [])
            if i % 2 == 0:
                sets += ["A3"] + (["A1"] if j == 1 else [])
            for k in sets:
                cal[k].append(tile)
    return cal, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["vit_tiny_patch16_224", "convnext_atto"])
    ap.add_argument("--check-images", type=int, default=32)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[99, 7])
    ap.add_argument("--tiles", action="store_true", help="held-out quadrants (see above)")
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    paths = archs._sample_paths()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if opts.tiles:
            sets, held = quadrants(paths, Path(tmp) / "tiles")
        else:
            sets = {"A": paths[::2], "B": paths[1::2], "all": paths}
            held = {k: archs._sample_photos(sets[k]) for k in ("A", "B")}
        for arch in opts.archs:
            torch.manual_seed(0)
            cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
            size = cfg["input_size"][-1]
            checks = {k: archs.crops(imgs, opts.check_images, size, cfg["mean"], cfg["std"],
                                     8765) for k, imgs in held.items()}
            for cal in sets:
                out, report, secs = calibrate(arch, sets[cal], Path(tmp), cal)
                keys = archs.movable_keys(report)
                model = timm.create_model(arch, pretrained=False)
                model.load_state_dict(load_file(str(out)))
                for chk, x in checks.items():
                    spreads = [archs.spread(archs.rates(model, x, opts.draws, s), keys)
                               for s in opts.seeds]
                    row = dict(arch=arch, calibrated_on=cal, checked_on=chk,
                               held_out=opts.tiles or (cal != chk and cal != "all"),
                               distinct=len(sets[cal]), seconds=round(secs, 1),
                               spread=[round(v, 3) for v in spreads],
                               output_std=round(float(archs.outputs(model, x).std()), 4))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if opts.json:
        opts.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

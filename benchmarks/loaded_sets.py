"""Which check images make a loaded net's unit end "further from the mean"?

`archs.py --split --kinds loaded` found two loaded vit_tiny units that end further from the
mean rate than they started on the held-out sample photos, and none on other crops of the
calibration photos. This separates the photo set from the step. It calibrates the
trained-like weights (archs.py's recipe and seed) on half A of the sample photos (CLI,
default settings), then measures before against after with archs.py's code on three check
sets: other crops of A, the 6 photos of half B (never seen), and the far-off scikit-image
photos (never seen), each with 2 crop seeds x 2 gradient-draw seeds; `worst` is the unit
that gained most distance from the mean, with its log distance before and after. Then,
one photo at a time, it gives each unit group's mean log rate minus the mean over all
movable units, after the step: how much the photo alone moves the ratios that the step
set. Without BatchNorm the expected squared gradient of a batch is the sum of its
images' (each image gets its own random g), so these are the parts that every photo set
averages; with BatchNorm a one-photo batch has other statistics, and the column is only
indicative.

    .venv/bin/python benchmarks/loaded_sets.py --archs vit_tiny_patch16_224 convnext_atto \
        mobilenetv3_small_100 --json benchmarks/results/archs/loaded-sets.json

With `--tiles` the step calibrates on the four quadrants of each photo of A instead: 28
distinct images of the same 7 photos.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archs  # noqa: E402  (the measuring code, shared with archs.py, not with ckptinit)
from photo_sets import calibrate, quadrant_boxes  # noqa: E402


def group_of(key: str) -> str:
    """A unit's kind without its indices: blocks.3.mlp.fc1 -> blocks.mlp.fc1."""
    return re.sub(r"\.\d+(?=[.\[]|$)", "", key)


def tiles(photos: list[Path], folder: Path) -> list[Path]:
    """The four quadrants of every photo, saved as images of their own."""
    folder.mkdir()
    out = []
    for p in photos:
        img = Image.open(p).convert("RGB")
        for q, box in enumerate(quadrant_boxes(img)):
            out.append(folder / f"{p.stem}-q{q}.png")
            img.crop(box).save(out[-1])
    return out


def deviations(r: dict[str, float], keys: list[str]) -> dict[str, float]:
    ks = [k for k in keys if r.get(k, 0) > 0]
    mean = archs.log_mean(r, ks)
    return {k: math.log(r[k]) - mean for k in ks}


def run(arch: str, draws: int, quartered: bool, tmp: Path) -> dict:
    torch.manual_seed(0)  # archs.py's draw of the trained-like weights
    before = archs.trained_like(timm.create_model(arch, pretrained=False), 1)
    ck = tmp / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in before.state_dict().items()}, str(ck))
    paths = archs._sample_paths()
    cal = tiles(paths[::2], tmp / "tiles") if quartered else paths[::2]
    out, report, _ = calibrate(arch, cal, tmp, "A", [str(ck), "--arch", arch])
    after = timm.create_model(arch, pretrained=False)
    after.load_state_dict(load_file(str(out)))
    keys, cfg = archs.movable_keys(report), before.pretrained_cfg
    size = cfg["input_size"][-1]
    sets = {"A (other crops)": archs._sample_photos(paths[::2]),
            "B (held-out photos)": archs._sample_photos(paths[1::2]),
            "far-off photos": archs._skimage_photos()}
    checks = []
    for name, photos in sets.items():
        for crop_seed in (8765, 1111):
            x = archs.crops(photos, 32, size, cfg["mean"], cfg["std"], crop_seed)
            for draw_seed in (99, 5):
                b, a = (archs.rates(m, x, draws, draw_seed) for m in (before, after))
                db, da = deviations(b, keys), deviations(a, keys)
                moved = {k: abs(da[k]) - abs(db[k]) for k in db if k in da}
                worst = max(moved, key=moved.get)
                row = dict(set=name, crop_seed=crop_seed, draw_seed=draw_seed,
                           spread=[archs.spread(b, keys), archs.spread(a, keys)],
                           further=archs.further_from_mean(b, a, keys),
                           worst=[worst, round(db[worst], 3), round(da[worst], 3)])
                checks.append(row)
                print(json.dumps(row), flush=True)
    groups = sorted({group_of(k) for k in keys})
    per_photo = []
    for i, p in enumerate(paths):
        x = archs.crops(archs._sample_photos([p]), 16, size, cfg["mean"], cfg["std"], 8765)
        dev = deviations(archs.rates(after, x, draws, 99), keys)
        row = {"photo": p.stem, "half": "AB"[i % 2]}
        for g in groups:
            vals = [v for k, v in dev.items() if group_of(k) == g]
            row[g] = round(sum(vals) / len(vals), 3)
        per_photo.append(row)
        print(json.dumps(row), flush=True)
    return dict(arch=arch, calibration="A quadrants" if quartered else "A", units=len(keys),
                checks=checks, per_photo=per_photo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["vit_tiny_patch16_224"])
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--tiles", action="store_true",
                    help="calibrate on the 4 quadrants of each photo of A (28 distinct images)")
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    rows = []
    for arch in opts.archs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(arch, opts.draws, opts.tiles, Path(tmp)))
    if opts.json:
        opts.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()

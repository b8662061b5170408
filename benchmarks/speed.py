"""What ckptinit costs, side by side in one run (medians of several, alternated):

- forward: the within-layer step / one plain no-grad forward over the same images, in one
  batch and in 8 batches (resnet50, vgg11; in one process, model creation not counted);
- process: the whole `ckptinit rescale MODEL --no-between --images 128 --batch-size 128`
  process / the bare build-read-forward-save script (benchmarks/bare.py);
- lsuv: the within-layer job and the full default run / `lsuv.lsuv_with_singlebatch` on the
  same images (resnet18, resnet50), with each result's per-channel std error on held-out
  images (eval mode: the model as it is saved);
- memory: whole `ckptinit rescale resnet18 --input-size 128 --images N --data FOLDER`
  processes (within-layer job and full default) for N = 256, 1024, 4096: peak RSS (and
  peak device memory on CUDA) against a plain no-grad forward of one batch, and time.

    pip install -e ".[bench]"        # the lsuv package
    python benchmarks/speed.py --json benchmarks/speed.json --markdown benchmarks/speed.md
    python benchmarks/speed.py --sections memory --runs 2 --folder /tmp/ckptinit-images
    python benchmarks/readme_section.py cpu benchmarks/speed.md    # into the README

The figures are ratios measured on the same machine in the same run, because the
machines here are shared; the load average is recorded at the start and end of each
section.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

from ckptinit.api import rescale  # noqa: E402
from ckptinit.data import load_calibration  # noqa: E402
from ckptinit.device import resolve_device  # noqa: E402
from ckptinit.method.units import scan_units  # noqa: E402
from ckptinit.method.within import measure_outputs  # noqa: E402
from ckptinit.options import CalibrationOptions, RescaleOptions  # noqa: E402

SECTIONS = ("forward", "process", "lsuv", "memory")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False)


def alternate(fns: dict, runs: int, device) -> dict[str, list[float]]:
    """Each function once per round, in turn; a function returns its own seconds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            B.sync(device)
            times[name].append(fn())
    return times


# ---------------------------------------------------------------- forward
def section_forward(args, device) -> dict:
    out = []
    for name in args.forward_models:
        calib = load_calibration(build(name), CalibrationOptions(
            images=args.images, holdout=0, input_size=args.size))
        for nb in args.batches:
            bs = math.ceil(args.images / nb)
            stream = calib.batches(bs, device)
            plain = build(name).to(device).eval()
            passes = []

            plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)

            def forward(plain=plain, stream=stream):
                t = time.perf_counter()
                with torch.no_grad():
                    for x in stream:
                        plain(x)
                B.sync(device)
                return time.perf_counter() - t

            def within(name=name, stream=stream, bs=bs, passes=passes):
                model = build(name).to(device)
                B.sync(device)
                t = time.perf_counter()
                _, report = rescale(model, stream, RescaleOptions(
                    between=False, batch_size=bs, device=str(device)))
                B.sync(device)
                passes.append(report.within_passes)
                return time.perf_counter() - t

            forward()  # warm-up (allocator, kernels, page cache)
            times = alternate({"forward": forward, "within": within,
                               "forward_cl": lambda f=forward, m=plain_cl: f(plain=m)},
                              args.runs, device)
            row = dict(model=name, images=args.images, size=args.size or "model's",
                       batches=len(stream), batch_size=bs, runs=args.runs,
                       forward_s=B.median(times["forward"]), within_s=B.median(times["within"]),
                       forward_cl_s=B.median(times["forward_cl"]),
                       within_passes=passes[-1], all_s=times)
            row["within_over_forward"] = row["within_s"] / row["forward_s"]
            row["within_over_forward_cl"] = row["within_s"] / row["forward_cl_s"]
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "all_s"}), flush=True)
        calib.close()
    return {"rows": out}


# ---------------------------------------------------------------- process
def section_process(args, device) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ckptinit-speed-"))
    n, model = args.process_images, args.process_model
    common = ["--images", str(n), "--batch-size", str(n), "--device", str(device)]
    ck = B.python_cmd("-m", "ckptinit", "rescale", model, "--no-between", *common,
                      "-o", str(tmp / "a.safetensors"), "--force", "-q")
    bare = B.python_cmd(str(B.ROOT / "benchmarks" / "bare.py"), model, *common,
                        "-o", str(tmp / "b.safetensors"))
    # ckptinit's default layout (auto: channels-last for conv nets on the CPU) and the
    # contiguous one; the plain bare script (a user's script, the baseline) and a
    # channels-last one, so that the ratio is given against both
    cmds = {"ckptinit": [*ck, "--memory-format", "contiguous"],
            "ckptinit channels-last": [*ck, "--memory-format", "auto"],
            "bare": bare, "bare channels-last": [*bare, "--channels-last"]}
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for _ in range(args.runs):
        for k, cmd in cmds.items():
            runs[k].append(B.run_process(cmd, timeout=args.timeout))
    failed = {k: r[-1]["stderr"] for k, r in runs.items() if any(x["rc"] != 0 for x in r)}
    med = {k: B.median([x["seconds"] for x in r]) for k, r in runs.items()}
    row = dict(model=model, images=n, batch_size=n, runs=args.runs,
               ckptinit_s=med["ckptinit"], bare_s=med["bare"], median_s=med,
               all_s={k: [x["seconds"] for x in r] for k, r in runs.items()},
               peak_rss={k: B.median([x["peak_rss_bytes"] for x in r]) for k, r in runs.items()},
               commands={k: " ".join(c[2:]) for k, c in cmds.items()}, failed=failed)
    row["ratios"] = {f"{a} / {b}": med[a] / med[b] for a in cmds if a.startswith("ckptinit")
                     for b in cmds if b.startswith("bare") and med[a] and med[b]}
    if med["ckptinit"] and med["bare"]:
        row["ckptinit_over_bare"] = med["ckptinit"] / med["bare"]
    print(json.dumps({k: v for k, v in row.items() if k not in ("all_s", "commands")}),
          flush=True)
    return {"rows": [row]}


# ---------------------------------------------------------------- lsuv
@torch.no_grad()
def std_error(model: torch.nn.Module, holdout: torch.Tensor, device) -> dict:
    """Per unit, the mean over channels of |std - 1| of its output on held-out images, in
    eval mode; then the mean, median and worst over units."""
    model.eval()
    x = holdout.to(device)
    scan = scan_units(model, x[:2])
    moments = measure_outputs(model, scan.units, [x])
    errs = [float((moments[u.name].std - 1).abs().mean()) for u in scan.units
            if u.name in moments]
    return {"mean": statistics.fmean(errs), "median": statistics.median(errs),
            "max": max(errs), "units": len(errs)}


def section_lsuv(args, device) -> dict:
    try:
        import lsuv
    except ImportError:
        return {"skipped": "the lsuv package is not installed (pip install -e '.[bench]')"}
    out = []
    for name in args.lsuv_models:
        calib = load_calibration(build(name), CalibrationOptions(
            images=args.lsuv_images, holdout=args.holdout, input_size=args.lsuv_size))
        n = calib.num_images
        stream = calib.batches(n, device)
        x = calib.images  # LSUV takes one tensor: the same images, in one batch
        results: dict[str, torch.nn.Module] = {}

        def job(kind, name=name, x=x, stream=stream, n=n, calib=calib, results=results):
            def run():
                model = build(name).to(device)
                B.sync(device)
                t = time.perf_counter()
                if kind == "lsuv":
                    lsuv.lsuv_with_singlebatch(model, x, verbose=False, device=device)
                else:
                    rescale(model, stream, RescaleOptions(
                        between=kind == "full", batch_size=n, device=str(device)),
                        holdout=calib.holdout)
                B.sync(device)
                results[kind] = model
                return time.perf_counter() - t
            return run

        kinds = [k for k in ("within", "full") if k in args.lsuv_kinds] + ["lsuv"]
        times = alternate({k: job(k) for k in kinds}, args.runs, device)
        med = {k: B.median(v) for k, v in times.items()}
        errors = {k: std_error(m, calib.holdout, device) for k, m in results.items()}
        errors["timm init"] = std_error(build(name).to(device), calib.holdout, device)
        row = dict(model=name, images=n, size=args.lsuv_size or "model's",
                   holdout=calib.holdout.shape[0], runs=args.runs, lsuv_s=med["lsuv"],
                   std_error=errors, all_s=times)
        for k in kinds[:-1]:  # within_s, lsuv_over_within, full_s, lsuv_over_full
            row[f"{k}_s"], row[f"lsuv_over_{k}"] = med[k], med["lsuv"] / med[k]
        out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "all_s"}), flush=True)
        calib.close()
    return {"rows": out, "lsuv_version": getattr(lsuv, "__version__", "0.3.0")}


# ---------------------------------------------------------------- memory
def section_memory(args, device) -> dict:
    need = max(args.memory_images) + args.holdout
    folder = B.make_image_folder(Path(args.folder or Path(tempfile.gettempdir())
                                      / "ckptinit-bench-images"), need)
    tmp = Path(tempfile.mkdtemp(prefix="ckptinit-mem-"))
    base = ["--input-size", str(args.memory_size), "--data", str(folder),
            "--device", str(device), "--holdout", str(args.holdout)]

    def job(n: int, mode: str) -> list[str]:
        extra = ["--no-between"] if mode == "within" else []
        return B.python_cmd("-m", "ckptinit", "rescale", args.memory_model, "--images", str(n),
                            *extra, *base, "-o", str(tmp / f"{mode}{n}.safetensors"),
                            "--force", "-q", "--report", str(tmp / f"{mode}{n}.json"))

    ref_cmd = B.python_cmd(str(B.ROOT / "benchmarks" / "bare.py"), args.memory_model,
                           "--images", str(args.memory_batch), "--batch-size",
                           str(args.memory_batch), "--input-size", str(args.memory_size),
                           "--data", str(folder), "--device", str(device), "--no-save")
    keys = [(m, n) for m in args.memory_modes for n in args.memory_images]
    runs: dict = {k: [] for k in keys}
    refs = []
    for _ in range(args.memory_runs or args.runs):
        refs.append(B.run_process(ref_cmd, timeout=args.timeout))
        for mode, n in keys:
            r = B.run_process(job(n, mode), timeout=args.timeout)
            report = tmp / f"{mode}{n}.json"
            if r["rc"] == 0 and report.exists():
                r["resources"] = json.loads(report.read_text()).get("resources", {})
                report.unlink()
            runs[(mode, n)].append(r)
    ref_json = B.last_json(refs[-1]["stdout"]) or {}
    ref = dict(peak_rss_bytes=B.median([r["peak_rss_bytes"] for r in refs]),
               seconds=B.median([r["seconds"] for r in refs]),
               peak_device_bytes=ref_json.get("peak_device_bytes"), command=" ".join(ref_cmd[2:]))
    rows = []
    for (mode, n), rs in runs.items():
        ok = [r for r in rs if r["rc"] == 0]
        dev = [r.get("resources", {}).get("peak_device_bytes") for r in ok]
        row = dict(mode=mode, images=n, runs=len(rs), ok=len(ok),
                   seconds=B.median([r["seconds"] for r in ok]),
                   peak_rss_bytes=B.median([r["peak_rss_bytes"] for r in ok]),
                   peak_device_bytes=B.median([d for d in dev if d is not None]),
                   spool_bytes=(ok[-1].get("resources", {}).get("spool_bytes") if ok else None),
                   error=None if ok else rs[-1]["stderr"][-500:])
        if row["peak_rss_bytes"] and ref["peak_rss_bytes"]:
            row["rss_over_forward"] = row["peak_rss_bytes"] / ref["peak_rss_bytes"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    growth = {}
    lo, hi = min(args.memory_images), max(args.memory_images)
    for mode in args.memory_modes:
        a = next(r for r in rows if r["mode"] == mode and r["images"] == lo)
        b = next(r for r in rows if r["mode"] == mode and r["images"] == hi)
        if a["peak_rss_bytes"] and b["peak_rss_bytes"] and a["seconds"] and b["seconds"]:
            growth[mode] = dict(rss_ratio=b["peak_rss_bytes"] / a["peak_rss_bytes"],
                                time_ratio=b["seconds"] / a["seconds"], images_ratio=hi / lo)
    return {"rows": rows, "reference": ref, "growth": growth, "folder": str(folder),
            "command": " ".join(job(hi, args.memory_modes[-1])[2:])}


# ---------------------------------------------------------------- report
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Measured {result['date']} on {m.get('gpu') or 'CPU'} ({m['cpu_count']} cores, "
             f"torch {m['torch']}, device `{result['device']}`); `{result['command']}`.", ""]
    sec = result["sections"]
    if "forward" in sec and "rows" in sec["forward"]:
        lines += ["**Within-layer step / one plain forward** over the same images (one process;"
                  " model creation not counted; the within step in ckptinit's default layout, "
                  "the forward contiguous and channels-last):", "",
                  "| model | images | batches | forward | forward (channels-last) | within | "
                  "passes | within / forward | within / channels-last forward |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sec["forward"]["rows"]:
            lines.append(f"| {r['model']} | {r['images']} @ {r['size']} px | {r['batches']} | "
                         f"{r['forward_s']:.2f} s | {B.fmt(r.get('forward_cl_s'), suffix=' s')} "
                         f"| {r['within_s']:.2f} s | {r['within_passes']} "
                         f"| **{r['within_over_forward']:.2f}x** | "
                         f"**{B.fmt(r.get('within_over_forward_cl'), suffix='x')}** |")
        lines += [_load_line(sec["forward"]), ""]
    if "process" in sec and "rows" in sec["process"]:
        r = sec["process"]["rows"][0]
        meds = r.get("median_s") or {"ckptinit": r["ckptinit_s"], "bare": r["bare_s"]}
        lines += ["**Whole processes**: the within-layer job / the bare build-read-forward-save "
                  "script:", "", "| job | median | peak RSS |", "|---|---|---|"]
        lines += [f"| `{r['commands'][k]}` | {B.fmt(v)} s | {B.mib(r['peak_rss'][k])} |"
                  for k, v in meds.items()]
        ratios = r.get("ratios") or {"ckptinit / bare": r.get("ckptinit_over_bare")}
        lines += [f"| ratio {k} | **{B.fmt(v)}x** | |" for k, v in ratios.items()]
        lines += [_load_line(sec["process"]), ""]
    if "lsuv" in sec:
        if "skipped" in sec["lsuv"]:
            lines += [f"lsuv comparison skipped: {sec['lsuv']['skipped']}", ""]
        else:
            rows = sec["lsuv"]["rows"]
            kinds = [k for k in ("within", "full") if rows and f"{k}_s" in rows[0]]
            title = {"within": "within", "full": "full default"}
            errs = [*kinds, "lsuv", "timm init"]
            lines += ["**Against `lsuv.lsuv_with_singlebatch`** on the same images (one batch); "
                      "std error = mean over units of mean over channels of |std - 1| on the "
                      "held-out images, eval mode (worst unit in brackets):", "",
                      "| model | images | " + " | ".join(title[k] for k in kinds) + " | lsuv | "
                      + " | ".join(f"lsuv / {k}" for k in kinds) + " | std error: "
                      + " | ".join(errs) + " |",
                      "|" + "---|" * (3 + 2 * len(kinds) + len(errs))]
            for r in rows:
                e = r["std_error"]
                err = " | ".join(f"{e[k]['mean']:.3f} ({e[k]['max']:.2f})" for k in errs)
                cells = [f"{r[f'{k}_s']:.2f} s" for k in kinds] + [f"{r['lsuv_s']:.2f} s"]
                cells += [f"**{r[f'lsuv_over_{k}']:.2f}x**" for k in kinds]
                lines.append(f"| {r['model']} | {r['images']} @ {r['size']} px | "
                             + " | ".join(cells) + f" | {err} |")
            lines += [_load_line(sec["lsuv"]), ""]
    if "memory" in sec and "rows" in sec["memory"]:
        mm = sec["memory"]
        ref = mm["reference"]
        lines += [f"**Memory as --images grows** (whole processes, `{mm['command']}`; "
                  f"reference: one no-grad forward of one batch, peak RSS "
                  f"{B.mib(ref['peak_rss_bytes'])}"
                  + (f", device {B.mib(ref['peak_device_bytes'])}"
                     if ref.get("peak_device_bytes") else "") + "):", "",
                  "| job | images | time | peak RSS | RSS / forward | peak device | spool |",
                  "|---|---|---|---|---|---|---|"]
        for r in mm["rows"]:
            lines.append(f"| {r['mode']} | {r['images']} | {B.fmt(r['seconds'], '.1f')} s | "
                         f"{B.mib(r['peak_rss_bytes'])} | {B.fmt(r.get('rss_over_forward'))}x | "
                         f"{B.mib(r['peak_device_bytes'])} | {B.mib(r['spool_bytes'])} |")
        for mode, g in mm["growth"].items():
            lines.append(f"\n{mode}: {g['images_ratio']:.0f}x the images -> peak RSS "
                         f"**{g['rss_ratio']:.2f}x**, time **{g['time_ratio']:.1f}x**.")
        lines += [_load_line(mm), ""]
    return "\n".join(lines)


def _load_line(section: dict) -> str:
    a, b = section.get("load_before"), section.get("load_after")
    if not a or not b:
        return ""
    return f"\n(load average {a[0]:.1f} before, {b[0]:.1f} after; {section['seconds']:.0f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    ap.add_argument("--holdout", type=int, default=16)
    ap.add_argument("--forward-models", default="resnet50,vgg11")
    ap.add_argument("--images", type=int, default=128, help="forward section")
    ap.add_argument("--size", type=int, default=None, help="forward section input size")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--process-model", default="resnet50")
    ap.add_argument("--process-images", type=int, default=128)
    ap.add_argument("--lsuv-models", default="resnet18,resnet50")
    ap.add_argument("--lsuv-images", type=int, default=32)
    ap.add_argument("--lsuv-size", type=int, default=128)
    ap.add_argument("--lsuv-kinds", default="within,full", help="ckptinit jobs timed against lsuv")
    ap.add_argument("--memory-model", default="resnet18")
    ap.add_argument("--memory-images", default="256,1024,4096")
    ap.add_argument("--memory-size", type=int, default=128)
    ap.add_argument("--memory-batch", type=int, default=64)
    ap.add_argument("--memory-modes", default="within,full")
    ap.add_argument("--memory-runs", type=int, default=None, help="default: --runs")
    ap.add_argument("--folder", default=None, help="image folder for the memory section")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    args.forward_models = args.forward_models.split(",")
    args.lsuv_models = args.lsuv_models.split(",")
    args.lsuv_kinds = args.lsuv_kinds.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.memory_images = [int(n) for n in args.memory_images.split(",")]
    args.memory_modes = args.memory_modes.split(",")
    logging.disable(logging.WARNING)
    device = resolve_device(args.device)
    result = {"date": time.strftime("%Y-%m-%d"), "device": str(device),
              "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
              "machine": B.machine(str(device)), "sections": {}}
    for name in args.sections.split(","):
        fn = globals()[f"section_{name}"]
        before, t = B.machine()["load_avg"], time.perf_counter()
        try:
            sec = fn(args, device)
        except Exception as e:  # one broken section must not lose the others
            sec = {"error": f"{type(e).__name__}: {e}"}
            print(f"section {name} failed: {sec['error']}", file=sys.stderr, flush=True)
        sec.update(load_before=before, load_after=B.machine()["load_avg"],
                   seconds=time.perf_counter() - t)
        result["sections"][name] = sec
        if args.json:  # after every section, so that a stopped run keeps what it has
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

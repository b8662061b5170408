"""The GPU checks of issue 14 that are not timings of speed.py; benchmarks/gpu.sh runs them.

    python benchmarks/gpu_checks.py syncs --json R/syncs.json
    python benchmarks/gpu_checks.py e2e resnet50 --images 1024 --data FOLDER --json R/e2e.json
    python benchmarks/gpu_checks.py write R        # R/*.json -> the README's gpu section

`syncs`: batches from the spool on CUDA are the CPU's bit for bit; and how many times the
host waits for the device (torch.cuda.set_sync_debug_mode counts every .item(), .cpu(),
blocking copy...) while batches stream, in the within-layer step and in the full run, next
to the number of units and batches (a count that grows with units x batches is a per-layer
round trip). `e2e`: one whole `ckptinit rescale` process: wall time, the report's stage
timings, peak host and device memory, and the function check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402


def count_syncs(fn) -> tuple[int, list[str]]:
    """Run fn with the CUDA sync debugger on; (number of host syncs, a few messages)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), syncs[:3]


def syncs(args) -> dict:
    import timm
    import torch

    from ckptinit.api import rescale
    from ckptinit.data import load_calibration
    from ckptinit.method.units import scan_units
    from ckptinit.options import CalibrationOptions, RescaleOptions

    logging_off()
    out: dict = {"machine": B.machine("cuda")}
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    with load_calibration(model, CalibrationOptions(images=args.images, holdout=16)) as cs:
        cpu = list(cs.batches(args.images // 8))
        gpu = cs.batches(args.images // 8, "cuda")
        out["exact"] = all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
        list(gpu)  # warm-up: constants and pinned blocks
        n, msgs = count_syncs(lambda: [b.sum() for b in gpu])
        out["stream"] = {"batches": len(gpu), "syncs": n, "examples": msgs}
        units = len(scan_units(model, cpu[0][:2]).units)
        for nb in (1, 8):
            bs = args.images // nb
            for between in (False, True):
                torch.manual_seed(0)
                m = timm.create_model(args.model, pretrained=False).cuda()
                stream = cs.batches(bs, "cuda")
                t = time.perf_counter()
                n, msgs = count_syncs(lambda m=m, stream=stream, bs=bs, between=between: rescale(
                    m, stream, RescaleOptions(between=between, batch_size=bs, device="cuda"),
                    holdout=cs.holdout))
                key = f"{'full' if between else 'within'}_{nb}"
                out[key] = {"batches": nb, "units": units, "syncs": n, "examples": msgs,
                            "seconds_with_debugger": time.perf_counter() - t}
                print(key, out[key], flush=True)
    out["model"], out["images"] = args.model, args.images
    return out


def e2e(args) -> dict:
    report = Path(args.json).with_suffix(".report.json")
    cmd = B.python_cmd("-m", "ckptinit", "rescale", args.model, "--images", str(args.images),
                       "--data", args.data, "-o", f"/tmp/ckptinit-e2e-{args.model}.safetensors",
                       "--force", "-q", "--report", str(report), "--device", args.device)
    r = B.run_process(cmd, env={"HF_HUB_OFFLINE": "1"}, timeout=args.timeout)
    out = {"model": args.model, "images": args.images, "command": " ".join(cmd[2:]),
           "wall_s": r["seconds"], "rc": r["rc"], "peak_rss_bytes": r["peak_rss_bytes"]}
    if r["rc"] == 0 and report.exists():
        rep = json.loads(report.read_text())
        out.update(timings=rep.get("timings"), resources=rep.get("resources"),
                   function_check=rep.get("function_check"),
                   within_passes=rep.get("within_passes"),
                   between_iterations=rep.get("between_iterations"))
    else:
        out["stderr"] = r["stderr"][-1500:]
    return out


def write(args) -> None:
    import speed

    res = Path(args.results)
    load = {p.stem: json.loads(p.read_text()) for p in sorted(res.glob("*.json"))
            if not p.name.endswith(".report.json")}
    machine = load.get("machine") or {}
    card = machine.get("gpu") or "no GPU"
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on **{card}** "
             f"({machine.get('gpu_memory_gib', '?')} GiB, {machine.get('cpu_count')} CPU cores, "
             f"torch {machine.get('torch')}) by `bash benchmarks/gpu.sh`.", ""]
    tests = res / "tests.txt"
    if tests.exists():
        lines += [f"GPU tests (`tests/test_device.py`, `tests/data/test_batches.py`): "
                  f"{tests.read_text().strip().splitlines()[-1]}", ""]
    e2e_rows = [v for k, v in load.items() if k.startswith("e2e_")]
    if e2e_rows:
        lines += ["**End to end** (`ckptinit rescale MODEL --images N --data FOLDER`, one "
                  "whole process; pipeline = model build + decode + both steps + write, from "
                  "the report's timings, in seconds):", "",
                  "| model | images | wall (process) | pipeline | load | data | within | between "
                  "| write | peak device | peak RSS | function check |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e_rows:
            t, res_ = r.get("timings") or {}, r.get("resources") or {}
            fc = r.get("function_check") or {}
            lines.append(
                f"| {r['model']} | {r['images']} | {B.fmt(r['wall_s'], '.1f')} s | "
                f"**{B.fmt(t.get('pipeline'), '.1f')} s** | {B.fmt(t.get('load'), '.1f')} | "
                f"{B.fmt(t.get('data'), '.1f')} | {B.fmt(t.get('within'), '.1f')} | "
                f"{B.fmt(t.get('between'), '.1f')} | {B.fmt(t.get('write'), '.1f')} | "
                f"{B.mib(res_.get('peak_device_bytes'))} | {B.mib(r.get('peak_rss_bytes'))} | "
                f"{B.fmt(fc.get('rel_change'), '.1e')} |" if r["rc"] == 0 else
                f"| {r['model']} | failed (rc {r['rc']}): {r.get('stderr', '')[-200:]!r} |")
        lines.append("")
    s = load.get("syncs")
    if s:
        lines += [f"**Host syncs** ({s['model']}, {s['images']} images; spool batches on CUDA "
                  f"equal the CPU's bit for bit: {s.get('exact')}): streaming "
                  f"{s['stream']['batches']} batches: {s['stream']['syncs']} syncs.", "",
                  "| run | batches | units | host syncs |", "|---|---|---|---|"]
        for k in ("within_1", "within_8", "full_1", "full_8"):
            if k in s:
                lines.append(f"| {k.split('_')[0]} | {s[k]['batches']} | {s[k]['units']} | "
                             f"{s[k]['syncs']} |")
        lines.append("")
    if "speed" in load:
        lines += [speed.markdown(load["speed"]), ""]
    missing = [n for n in ("e2e_resnet50", "syncs", "speed") if n not in load]
    if missing:
        lines.append(f"Not measured in this run (time or failure; see gpu.log): "
                     f"{', '.join(missing)}.")
    text = "\n".join(lines)
    (res / "gpu.md").write_text(text + "\n")
    B.replace_section("gpu", text)
    print(text)


def logging_off() -> None:
    import logging

    logging.disable(logging.WARNING)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("syncs")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--json", required=True)
    p = sub.add_parser("e2e")
    p.add_argument("model")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--data", required=True)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", required=True)
    p = sub.add_parser("write")
    p.add_argument("results")
    args = ap.parse_args()
    if args.cmd == "write":
        write(args)
        return
    result = syncs(args) if args.cmd == "syncs" else e2e(args)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str)[:2000])


if __name__ == "__main__":
    main()

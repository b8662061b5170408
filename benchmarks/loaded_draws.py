"""What the loaded default of 8 gradient draws costs: `ckptinit rescale` on a trained-like
checkpoint (archs.py's recipe) with `--grad-batches 2` against the default, alternated in
one run, medians of the between-layer step's time (the report's `timings.between`) and of
the whole process.

    python benchmarks/loaded_draws.py --archs resnet18 vit_tiny_patch16_224 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from archs import ckptinit, trained_like  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vit_tiny_patch16_224"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.archs:
            torch.manual_seed(0)
            model = trained_like(timm.create_model(name, pretrained=False), 1)
            ck = tmp / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck))
            runs: dict[str, list[tuple[float, float]]] = {"2": [], "default": []}
            for _ in range(args.repeats):
                for label, extra in (("2", ["--grad-batches", "2"]), ("default", [])):
                    report = tmp / "r.json"
                    code, secs, last = ckptinit(
                        [str(ck), "--arch", name, "-o", str(tmp / "out.safetensors"),
                         "--force", "--report", str(report), "--device", "cpu", *extra],
                        dict(os.environ, PYTHONPATH=str(ROOT)))
                    if code:
                        raise SystemExit(f"{name} {label}: exit {code}: {last}")
                    rep = json.loads(report.read_text())
                    runs[label].append((rep["timings"]["between"], secs))
                    draws = rep["options"]["grad_batches"]
                    print(f"{name} {label} ({draws} draws): between {runs[label][-1][0]:.1f} s, "
                          f"process {secs:.1f} s", flush=True)
            med = {k: (statistics.median(b for b, _ in v), statistics.median(s for _, s in v))
                   for k, v in runs.items()}
            row = {"arch": name, "between_s": {k: m[0] for k, m in med.items()},
                   "process_s": {k: m[1] for k, m in med.items()},
                   "between_ratio": med["default"][0] / med["2"][0],
                   "process_ratio": med["default"][1] / med["2"][1], "runs": runs}
            rows.append(row)
            print(f"{name}: default / 2 draws, between {row['between_ratio']:.2f}x, whole "
                  f"process {row['process_ratio']:.2f}x (medians of {args.repeats})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()

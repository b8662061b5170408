"""`ckptinit rescale --dry-run` (issue 13, item 5): its wall time on resnet50 from the CLI, and
its memory estimate against a real run's, both as whole processes.

    python benchmarks/dry_run.py            # writes benchmarks/results/dry_run.json

1. Wall time: `ckptinit rescale resnet50 --dry-run -o x.safetensors` three times (median),
   in an empty folder that must stay empty.
2. Memory: the dry run's estimate for `rescale resnet18 --images 32 --batch-size 32
   --iters 1` against the real run's peak RSS minus the dry run's own (both processes
   import torch and build the model; what the real run holds beyond that is its passes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bench import ROOT, machine, median, python_cmd, run_process  # noqa: E402

RUNS = 3
MEMORY_RUN = ["resnet18", "--images", "32", "--batch-size", "32", "--holdout", "8",
              "--iters", "1", "--device", "cpu", "-q"]


def time_resnet50() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = python_cmd("-m", "ckptinit", "rescale", "resnet50", "--dry-run", "-o",
                         str(Path(tmp) / "x.safetensors"))
        runs = [run_process(cmd) for _ in range(RUNS)]
        left = sorted(p.name for p in Path(tmp).iterdir())
    assert all(r["rc"] == 0 for r in runs), runs[-1]["stderr"]
    return {"command": "ckptinit rescale resnet50 --dry-run -o x.safetensors",
            "seconds": [round(r["seconds"], 2) for r in runs],
            "median_seconds": round(median([r["seconds"] for r in runs]), 2),
            "peak_rss_bytes": runs[-1]["peak_rss_bytes"], "files_left": left}


def memory_check() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r18.safetensors")
        dry = subprocess.run(python_cmd("-m", "ckptinit", "rescale", *MEMORY_RUN, "-o", out,
                                        "--dry-run", "--json"), capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert dry.returncode == 0, dry.stderr
        plan = json.loads(dry.stdout)  # the whole of stdout is the JSON
        dry_rss = int(re.findall(r"@@peak_rss_bytes (\d+)", dry.stderr)[-1])
        real = run_process(python_cmd("-m", "ckptinit", "rescale", *MEMORY_RUN, "-o", out))
        assert real["rc"] == 0, real["stderr"]
    mem = plan["memory"]
    beyond = real["peak_rss_bytes"] - dry_rss
    estimate = mem["peak_bytes"] - mem["parameter_bytes"] - mem["buffer_bytes"]
    return {"command": "ckptinit rescale " + " ".join(MEMORY_RUN) + " -o r18.safetensors",
            "estimated_peak_bytes": mem["peak_bytes"], "estimated_phase": mem["peak_phase"],
            "estimated_beyond_model_bytes": estimate,
            "real_peak_rss_bytes": real["peak_rss_bytes"],
            "dry_run_peak_rss_bytes": dry_rss,
            "real_beyond_dry_run_bytes": beyond,
            "ratio_estimate_to_real": round(estimate / beyond, 2) if beyond > 0 else None,
            "estimated_forwards": plan["forwards"], "estimated_backwards": plan["backwards"],
            "real_seconds": round(real["seconds"], 1)}


def main() -> None:
    result = {"machine_before": machine(), "resnet50_dry_run": time_resnet50()}
    result["memory_check"] = memory_check()
    result["machine_after"] = machine()
    path = ROOT / "benchmarks" / "results" / "dry_run.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

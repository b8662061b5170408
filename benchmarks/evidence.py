"""Issue 10's evidence benchmark in one command: the four scripts in sequence, timed, and the
Markdown of benchmarks/README.md's evidence section regenerated from their JSON.

    python benchmarks/evidence.py --quick                 # all four, --quick (< 5 min)
    python benchmarks/evidence.py                         # default settings (< 30 min)
    python benchmarks/evidence.py --results-dir DIR       # write elsewhere (e.g. a baseline)
    python benchmarks/evidence.py --tables DIR            # print the Markdown of a results dir
    python benchmarks/evidence.py --readme DIR            # ... and put it into README.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _digits as D  # noqa: E402

SCRIPTS = ["convergence.py", "pretrained.py", "rate_plots.py", "step0.py", "within_check.py"]
BEGIN, END = "<!-- evidence:begin -->", "<!-- evidence:end -->"


def run_all(quick: bool, results_dir: Path, scripts: list[str] = SCRIPTS) -> dict:
    times = {}
    env = dict(os.environ, PYTHONPATH=str(D.ROOT))
    for script in scripts:
        cmd = [sys.executable, str(HERE / script), "--results-dir", str(results_dir)]
        if quick:
            cmd.append("--quick")
        D.log(f"$ {' '.join(cmd)}")
        t = time.time()
        p = subprocess.run(cmd, env=env, cwd=str(D.ROOT), stdout=subprocess.DEVNULL)
        times[script] = {"seconds": time.time() - t, "rc": p.returncode}
        D.log(f"{script}: rc {p.returncode}, {times[script]['seconds']:.0f} s")
    return times


def tables(results_dir: Path) -> str:
    import convergence
    import pretrained
    import rate_plots
    import step0
    import within_check

    rel = os.path.relpath(results_dir, HERE)
    out = []
    run = results_dir / "run.json"
    if run.exists():
        r = json.loads(run.read_text())
        out.append(f"Run: `{r['command']}`, {r['total_seconds'] / 60:.1f} min in all ("
                   + ", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in
                               r["scripts"].items()) + ").\n")
    conv = results_dir / "convergence.json"
    if conv.exists():
        c = json.loads(conv.read_text())
        g = c["provenance"]["git"]
        out.append(f"ckptinit: `{g.get('ckptinit_last_commit')}` (benchmark code at "
                   f"{(g.get('commit') or '')[:10]}"
                   f"{', ckptinit/ modified' if g.get('dirty_ckptinit') else ''}); torch "
                   f"{c['provenance']['torch']}, timm {c['provenance']['timm']}, lsuv "
                   f"{c['provenance']['lsuv']}.\n")
        out.append(f"### Convergence from scratch (`convergence.py`)\n\n![losses and accuracy "
                   f"against lr]({rel}/convergence.png)\n")
        out.append(convergence.markdown(c))
        for extra in sorted(results_dir.glob("*/convergence.json")):
            e = json.loads(extra.read_text())
            out.append(f"Supplement `{e['provenance']['command']}` "
                       f"({os.path.relpath(extra, HERE)}):\n")
            out.append(convergence.markdown(e))
    pre = results_dir / "pretrained.json"
    if pre.exists():
        out.append("### A self-supervised checkpoint, fine-tuned (`pretrained.py`)\n")
        out.append(pretrained.markdown(json.loads(pre.read_text())))
    rates = results_dir / "rates.json"
    if rates.exists():
        out.append("### Change rates per layer (`rate_plots.py`)\n")
        pngs = sorted((results_dir / "rates").glob("*.png"))
        out.append(" · ".join(f"[{p.stem}]({rel}/rates/{p.name})" for p in pngs) + "\n")
        out.append(rate_plots.markdown(json.loads(rates.read_text())) + "\n")
    s0 = results_dir / "step0.json"
    if s0.exists():
        out.append("### Step 0 on the no-BN VGG, and candidate fixes (`step0.py`)\n")
        out.append(f"![candidates: loss and accuracy against lr]({rel}/step0_train.png)\n")
        full = json.loads(s0.read_text())
        (results_dir / "step0.md").write_text(step0.markdown(full) + "\n")
        out.append(f"Per-layer tables for every init and net: [step0.md]({rel}/step0.md). "
                   "Here: vgg11, seed 0.\n")
        out.append(step0.markdown(full, metrics=["rate_ce", "M_over_s_median", "M_over_s_max",
                                                 "amp", "out_std"], layer_nets=["vgg11"]))
    wc = results_dir / "within_check.json"
    if wc.exists():
        out.append("### What the within-layer step leaves behind (`within_check.py`)\n")
        out.append(within_check.markdown(json.loads(wc.read_text())) + "\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir")
    ap.add_argument("--scripts", default=",".join(SCRIPTS),
                    help="comma-separated subset of the scripts (default: all)")
    ap.add_argument("--tables", metavar="DIR")
    ap.add_argument("--readme", metavar="DIR", help="replace the part of benchmarks/README.md "
                    f"between {BEGIN} and {END} with the tables of DIR")
    args = ap.parse_args()
    if args.tables:
        print(tables(Path(args.tables)))
        return
    if args.readme:
        readme = HERE / "README.md"
        text = readme.read_text()
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        readme.write_text(text[:a] + "\n" + tables(Path(args.readme)) + "\n" + text[b:])
        return
    d = D.results_dir(args.results_dir, args.quick)
    t0 = time.time()
    times = run_all(args.quick, d, args.scripts.split(","))
    D.write_json({"command": " ".join(["python", *[os.path.relpath(a, D.ROOT) if
                                                   a.startswith("/") else a
                                                   for a in sys.argv]]),
                  "scripts": times, "total_seconds": time.time() - t0,
                  "provenance": D.provenance()}, d / "run.json")
    D.log(f"all done in {(time.time() - t0) / 60:.1f} min; results in {d}")


if __name__ == "__main__":
    main()

"""The model card (README.md) of a Hub-ready folder: a pure function of the run's report.

`render_card` reads the report as JSON values (what `ckptinit_report.json` holds), so the
card written with a folder and a card rendered later from its JSON are the same text.
Fields are read defensively: a status or an option this module does not know is shown as
it is, a missing field is left out, so a newer method or report layout does not break it.
Local paths never reach the card: `public_report` reduces them to their last name.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._helpers import json_default
from ..report import RunReport, heldout_words
from .plots import RATES_PNG, STATISTICS_PNG

PAPER = ("Krähenbühl, Doersch, Donahue and Darrell, *Data-dependent Initializations of "
         "Convolutional Neural Networks* (ICLR 2016, [arXiv 1511.06856]"
         "(https://arxiv.org/abs/1511.06856))")
BIBTEX = """@inproceedings{kraehenbuehl2016datadependent,
  title = {Data-dependent Initializations of Convolutional Neural Networks},
  author = {Kr{\\"a}henb{\\"u}hl, Philipp and Doersch, Carl and Donahue, Jeff and Darrell, Trevor},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2016}
}"""
LISTED_UNITS = 10  # unit names listed per status before "and N more"
OK = "ok"


# --------------------------------------------------------------------------- the report


def public_report(report: RunReport | Mapping[str, Any]) -> dict:
    """The report as JSON values with local paths reduced to their last name (the folder
    and its card may be published; a home-folder path tells nobody anything useful)."""
    raw = report.to_dict() if isinstance(report, RunReport) else dict(report)
    d = json.loads(json.dumps(raw, default=json_default))
    source = d.get("source") or {}
    kind = source.get("kind")
    if source.get("path"):
        source["path"] = Path(source["path"]).name
    if kind == "file" and source.get("source"):
        source["source"] = Path(source["source"]).name
    elif kind == "local-dir" and source.get("source"):
        prefix, _, path = source["source"].partition(":")
        source["source"] = f"{prefix}:{Path(path).name}"
    data = d.get("data") or {}
    if data.get("kind") not in (None, "hub", "samples"):
        for key in ("source", "resolved"):
            if data.get(key):
                data[key] = Path(data[key]).name
    return d


# --------------------------------------------------------------------------- small pieces


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def _code(x: Any) -> str:
    return f"`{x}`"


def _status(unit: Mapping[str, Any]) -> str:
    """The status the card shows: the between-layer one unless it is ok, else the
    within-layer one (as the table on the terminal does)."""
    between = unit.get("between_status")
    status = between if between not in (None, OK) else unit.get("status") or OK
    return str(status)


def _names(names: list[str]) -> str:
    shown = ", ".join(_code(n) for n in names[:LISTED_UNITS])
    more = len(names) - LISTED_UNITS
    return shown + (f" and {more} more" if more > 0 else "")


def headless(report: Mapping[str, Any]) -> bool:
    return (report.get("source") or {}).get("num_classes") == 0


def pipeline_tag(report: Mapping[str, Any]) -> str:
    return "image-feature-extraction" if headless(report) else "image-classification"


# --------------------------------------------------------------------------- front matter


def card_data(report: Mapping[str, Any], license: str | None = None):
    """The YAML front matter, through huggingface_hub's own `ModelCardData`."""
    from huggingface_hub import ModelCardData

    source, data = report.get("source") or {}, report.get("data") or {}
    base = source.get("repo_id") if source.get("kind") == "hf-hub" else None
    datasets = [data["resolved"]] if data.get("kind") == "hub" and data.get("resolved") else None
    task = pipeline_tag(report)
    return ModelCardData(library_name="timm", license=license, base_model=base,
                         datasets=datasets, pipeline_tag=task,
                         tags=[task, "timm", "ckptinit"])


# --------------------------------------------------------------------------- body sections


def _intro(report: Mapping[str, Any], repo_id: str | None) -> list[str]:
    source = report.get("source") or {}
    arch = source.get("architecture") or "model"
    title = repo_id.split("/")[-1] if repo_id else f"{arch} (ckptinit)"
    n = source.get("num_classes")
    head = "headless: pooled features" if n == 0 else (f"{n} classes" if n else "")
    lines = [f"# {title}", "",
             f"A timm `{arch}`{f' ({head})' if head else ''} whose weights were initialised "
             f"from data by ckptinit {report.get('version', '')}, "
             f"after {PAPER}: every layer is normalised on real images and every layer's "
             "relative change rate is equalised, so that one learning rate moves every layer "
             "by the same fraction."]
    lines += ["", f"**Starting point:** {_source_text(source)}"]
    return lines


def _source_text(source: Mapping[str, Any]) -> str:
    name, kind = source.get("source", "?"), source.get("kind")
    if not source.get("pretrained"):
        return f"a fresh `{name}` from timm (random weights, nothing pre-trained)."
    if kind == "hf-hub" and source.get("repo_id"):
        repo = source["repo_id"]
        rev = f" at revision `{source['revision']}`" if source.get("revision") else ""
        where = f"[{repo}](https://huggingface.co/{repo}){rev}"
    else:
        where = _code(name)
    text = f"the weights of {where}: {source.get('loaded_count', 0)} tensors loaded"
    missing = source.get("missing_keys") or []
    if missing:
        text += f", {len(missing)} left fresh ({_names(missing)})"
    dropped = source.get("dropped_keys") or []
    if dropped:
        text += f", {len(dropped)} in the checkpoint not used ({_names(dropped)})"
    return text + "."


def _how_made(report: Mapping[str, Any]) -> list[str]:
    lines = ["", "## How it was made", ""]
    command = report.get("command_line")
    if command:
        lines += ["```bash", command, "```", ""]
    else:
        lines += [f"With the ckptinit Python library ({report.get('command', 'rescale')}).", ""]
    lines.append(f"**Method:** `{report.get('method') or 'none'}`")
    options = report.get("options") or {}
    if options:
        lines += ["", "| option | value |", "|---|---|"]
        lines += [f"| {k} | {_code(json.dumps(v))} |" for k, v in options.items()]
    return lines


def _calibration(report: Mapping[str, Any]) -> list[str]:
    data = report.get("data") or {}
    if not data:
        return []
    kind = data.get("kind")
    where = data.get("resolved") or data.get("source")
    if kind == "hub":
        where = f"[{where}](https://huggingface.co/datasets/{where})"
    elif kind == "samples":
        where = "the sample photos shipped with ckptinit"
    else:
        where = _code(where)
    rows = [("source", f"{where} ({kind})")]
    for key, label in (("split", "split"), ("config", "configuration"),
                       ("revision", "revision"), ("num_images", "images (fitting)"),
                       ("num_holdout", "held-out images (checks)"), ("seed", "seed"),
                       ("shuffle_buffer", "shuffle buffer"), ("augmented", "images made by "
                       "random crops and flips"), ("skipped", "undecodable images skipped")):
        if data.get(key) not in (None, ""):
            rows.append((label, _code(data[key])))
    transform = data.get("transform") or {}
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"):
        if key in transform:
            rows.append((f"preprocessing: {key}", _code(json.dumps(transform[key]))))
    lines = ["", "## Calibration data", "", "| | |", "|---|---|"]
    return lines + [f"| {a} | {b} |" for a, b in rows]


def _summary(report: Mapping[str, Any]) -> list[str]:
    units = report.get("units") or []
    lines = ["", "## Per-unit summary", ""]
    normalised = [u for u in units if u.get("action", "none") != "none"]
    draws = sorted({str(u["draw"]) for u in normalised if u.get("draw")})
    lines.append(f"- {len(units)} units (convolutions and linear layers); {len(normalised)} "
                 "normalised by the within-layer step"
                 + (f" (draw: {', '.join(draws)})" if draws else "") + ".")
    iters = report.get("between_iterations") or 0
    if iters or report.get("converged") is not None:
        done = "converged" if report.get("converged") else "not converged"
        lines.append(f"- Change-rate spread (max/min) among the units that may move: "
                     f"{_num(report.get('rate_spread_before'))}× before, "
                     f"{_num(report.get('rate_spread_after'))}× after ({iters} "
                     f"iteration(s), {done})"
                     + (f"; {_num(report['rate_spread_heldout'])}× re-measured on "
                        f"{heldout_words(report.get('data') or {})} with other gradient draws"
                        if report.get("rate_spread_heldout") is not None else "") + ".")
        floor = report.get("rate_floor")
        if floor is not None and floor > 1 + (report.get("options") or {}).get("tol", 0.01):
            lines.append(f"- No function-preserving move brings that spread below "
                         f"{_num(floor)}×: {len(report.get('rate_floor_units') or [])} units "
                         "move only together and keep their ratios.")
    else:
        lines.append("- The between-layer step did not run.")
    counts = Counter(_status(u) for u in units)
    lines.append("- Statuses: " + ", ".join(f"{s}: {c}" for s, c in sorted(counts.items()))
                 + ".")
    for status in sorted(s for s in counts if s != OK):
        names = [u["name"] for u in units if _status(u) == status]
        reasons = sorted({str(u["between_reason"]) for u in units
                          if _status(u) == status and u.get("between_reason")})
        why = f" ({'; '.join(reasons[:3])})" if reasons else ""
        lines.append(f"  - {status}: {_names(names)}{why}")
    lines.append(f"- Function check: {_function_check(report.get('function_check'))}")
    lines += ["", f"![Change rate per unit, before and after]({RATES_PNG})", "",
              f"![Output mean and std per unit, before and after]({STATISTICS_PNG})"]
    return lines + _unit_table(units)


def _function_check(fc: Mapping[str, Any] | None) -> str:
    if not fc:
        return "not run (the between-layer step did not run)."
    verdict = (f"within the tolerance {_num(fc.get('tolerance'))}" if fc.get("enforced")
               else "not enforced: units were allowed to change the function")
    return (f"relative change of the {fc.get('scope', 'outputs')} on {fc.get('images', '?')} "
            f"held-out images {_num(fc.get('rel_change'))} ({verdict}).")


def _unit_table(units: list[Mapping[str, Any]]) -> list[str]:
    if not units:
        return []
    lines = ["", "<details><summary>Every unit</summary>", "",
             "| # | unit | kind | within | std before → after | rate before → after | "
             "scale r | status |", "|---|---|---|---|---|---|---|---|"]
    for i, u in enumerate(units):
        lines.append(
            f"| {i} | `{u.get('name')}` | {u.get('kind', '')} | {u.get('action', '')} | "
            f"{_num(u.get('std_before'))} → {_num(u.get('std_after'))} | "
            f"{_num(u.get('rate_before'))} → {_num(u.get('rate_after'))} | "
            f"{_num(u.get('r'))} | {_status(u)} |")
    return lines + ["", "</details>"]


def _how_to_load(report: Mapping[str, Any], repo_id: str | None) -> list[str]:
    where = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    use = ("features = model(images)  # pooled features, no classifier" if headless(report)
           else "logits = model(images)")
    lines = ["", "## How to load", "", "```python", "import timm", "",
             f'model = timm.create_model("{where}", pretrained=True)',
             "config = timm.data.resolve_model_data_config(model)",
             "transform = timm.data.create_transform(**config, is_training=False)",
             use, "```"]
    if not repo_id:
        lines += ["", "Once uploaded (`ckptinit push FOLDER REPO_ID`), load it with "
                  '`timm.create_model("hf-hub:REPO_ID", pretrained=True)`.']
    lines += ["", "For fine-tuning with a new head, pass `num_classes=N` to `create_model`."]
    return lines


def _citation() -> list[str]:
    return ["", "## Citation", "", "```bibtex", BIBTEX, "```"]


# --------------------------------------------------------------------------- the card


def render_card(report: RunReport | Mapping[str, Any], *, license: str | None = None,
                repo_id: str | None = None) -> str:
    """The README.md text: YAML front matter, then what was made, how, from what, the
    per-unit summary and plots, and how to load it (from `repo_id` when it is known)."""
    from huggingface_hub import ModelCard

    d = public_report(report)
    body = (_intro(d, repo_id) + _how_made(d) + _calibration(d) + _summary(d)
            + _how_to_load(d, repo_id) + _citation())
    card = ModelCard(f"---\n{card_data(d, license).to_yaml()}\n---\n\n" + "\n".join(body)
                     + "\n")
    return str(card)

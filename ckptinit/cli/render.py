"""Rich rendering for the CLI (the library never imports rich)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..output import metadata as md
from ..report import RunReport, UnitRecord, heldout_words

STATUS_STYLE = {"ok": "green", "dead": "yellow", "fallback": "yellow", "pinned": "cyan",
                "excluded": "magenta", "not converged": "red", "skipped": "dim",
                "not called": "dim"}
# Columns given up, in this order, when the table is wider than the console.
DROP_ORDER = ("kind", "#", "shape", "scale", "action", "compensation", "r", "mean")
COMPENSATION_WIDTH = 30  # longer descriptions end in an ellipsis (the JSON has them whole)


# --------------------------------------------------------------------------- numbers


def fmt_num(x: float | None) -> str:
    """Three significant digits, compact exponents: 0.0581, 167, 2.83e3, 4.5e-5."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    text = format(x, ".3g")
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def _arrow(before: float | None, after: float | None) -> str:
    if before is None and after is None:
        return "-"
    return fmt_num(before) if after is None else f"{fmt_num(before)}→{fmt_num(after)}"


def _spread(x: float | None) -> str:
    return "-" if x is None else f"{fmt_num(x)}×"


# --------------------------------------------------------------------------- unit table


def _status(u: UnitRecord) -> str:
    status = u.status if u.between_status in (None, "ok") else u.between_status
    if status == "dead" and u.dead:
        return f"dead ({u.dead})"
    return status


def relative(target_text: str, unit: str) -> str:
    """Shorten module names in a compensation that share the unit's parent path.

    'batchnorm layer1.0.bn1' for unit 'layer1.0.conv1' becomes 'batchnorm bn1'; a bare
    index keeps its parent ('downsample.1').
    """
    parts = unit.split(".")

    def shorten(m: re.Match) -> str:
        name = m.group(0)
        other = name.split(".")
        k = 0
        while k < min(len(parts), len(other)) - 1 and parts[k] == other[k]:
            k += 1
        while k > 0 and other[k].isdigit():
            k -= 1
        return ".".join(other[k:])

    return re.sub(r"\b[\w]+(?:\.[\w]+)+\b", shorten, target_text)


def _compensation(u: UnitRecord) -> str:
    if u.between_status in ("pinned", "excluded") and u.between_reason:
        return u.between_reason
    if not u.compensation or u.compensation == "-":
        return "-"
    return relative(u.compensation, u.name)


def _columns(report: RunReport) -> list[tuple[str, str, list[str]]]:
    """(header, justify, cells) for every column worth showing for this report."""
    units = report.units
    rescaled = report.command == "rescale"
    cols = [
        ("#", "right", [str(i) for i in range(len(units))]),
        ("unit", "left", [u.name for u in units]),
        ("kind", "left", [u.kind for u in units]),
        ("shape", "left", ["x".join(map(str, u.shape)) for u in units]),
    ]
    if rescaled:
        cols += [
            ("action", "left", [u.action.replace("+normalize", "+norm") for u in units]),
            ("mean\nbefore→after", "right", [_arrow(u.mean_before, u.mean_after) for u in units]),
            ("std\nbefore→after", "right", [_arrow(u.std_before, u.std_after) for u in units]),
            ("scale", "right", [fmt_num(u.scale) for u in units]),
            ("rate\nbefore", "right", [fmt_num(u.rate_before) for u in units]),
            ("rate\nafter", "right", [fmt_num(u.rate_after) for u in units]),
            ("r", "right", [fmt_num(u.r) for u in units]),
        ]
    else:
        cols += [
            ("mean", "right", [fmt_num(u.mean_before) for u in units]),
            ("std", "right", [fmt_num(u.std_before) for u in units]),
            ("rate", "right", [fmt_num(u.rate_before) for u in units]),
        ]
    cols += [
        ("compensation", "left", [_compensation(u) for u in units]),
        ("status", "left", [_status(u) for u in units]),
    ]
    # a step that did not run leaves whole columns empty: leave them out
    optional = {"scale", "rate\nbefore", "rate\nafter", "r", "rate", "compensation"}
    return [c for c in cols if c[0] not in optional or any(x != "-" for x in c[2])]


def _short(header: str) -> str:
    return header.split("\n")[0]


def _build(report: RunReport, cols: list[tuple[str, str, list[str]]]) -> Table:
    source = report.source.get("source", "")
    arch = report.source.get("architecture")
    title = f"ckptinit {report.command}: {source}"
    if arch and arch != source:
        title += f" ({arch})"
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False,
                  show_edge=False, collapse_padding=True,
                  title_justify="left", expand=False)
    for header, justify, _ in cols:
        short = _short(header)
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis",
                         max_width=COMPENSATION_WIDTH if short == "compensation" else None)
    statuses = [_status(u) for u in report.units]
    for i, status in enumerate(statuses):
        row: list[str | Text] = [c[2][i] for c in cols]
        style = STATUS_STYLE.get(status.split(" (")[0], "")
        row[-1] = Text(status, style=style)
        if _short(cols[-2][0]) == "compensation" and report.units[i].between_status in (
                "pinned", "excluded"):
            row[-2] = Text(row[-2], style="dim")
        table.add_row(*row)
    return table


def _natural_width(cols: list[tuple[str, str, list[str]]]) -> int:
    """Width of the table unsqueezed: widest cell per column, two spaces between columns."""
    total = 0
    for header, _, cells in cols:
        width = max([cell_len(line) for line in header.split("\n")]
                    + [cell_len(c) for c in cells])
        if _short(header) == "compensation":
            width = min(width, COMPENSATION_WIDTH)
        total += width
    return total + 2 * (len(cols) - 1)


def unit_table(report: RunReport, width: int | None = None) -> tuple[Table, list[str]]:
    """One row per unit; columns are given up (DROP_ORDER) until the table fits `width`.

    Unit names are never wrapped or cut. Returns the table and the columns left out.
    """
    cols = _columns(report)
    hidden: list[str] = []
    for name in DROP_ORDER:
        if width is None or _natural_width(cols) <= width:
            break
        if any(_short(c[0]) == name for c in cols):
            cols = [c for c in cols if _short(c[0]) != name]
            hidden.append(name)
    return _build(report, cols), hidden


def summary_line(report: RunReport) -> str:
    """One line: what the run did, how far apart the change rates are, what was checked."""
    units = report.units
    counts = Counter(u.between_status for u in units)
    parts = [f"{len(units)} units"]
    if report.command == "rescale":
        normalised = sum(u.action != "none" for u in units)
        draws = sorted({u.draw for u in units if u.draw and u.draw != "keep"})
        parts.append(f"{normalised} normalised" + (f" ({'/'.join(draws)} draw)" if draws else ""))
        if report.between_iterations or report.converged is not None:
            movable = counts["ok"] + counts["not converged"]
            floor = report.rate_floor
            low = floor is not None and floor > 1 + report.options.get("tol", 0.01)
            held = report.rate_spread_heldout
            parts.append(f"rate spread {_spread(report.rate_spread('before'))} → "
                         f"{_spread(report.rate_spread('after'))}"
                         + (f" ({_spread(held)} on {heldout_words(report.data)}, other draws)"
                            if held is not None else "")
                         + (f" (floor {_spread(floor)}: units that move only together)"
                            if low else "")
                         + f" over {movable} movable units "
                         f"in {report.between_iterations} iteration(s)"
                         + ("" if report.converged else ", NOT converged"))
        else:
            parts.append("between-layer step skipped")
    else:
        parts.append(f"rate spread {_spread(report.rate_spread('before', movable_only=False))}"
                     f" over units with gradient, {_spread(report.rate_spread('before'))} among "
                     "units that may move")
    if counts:
        parts.append(f"{counts['pinned']} pinned, {counts['excluded']} excluded")
        if counts["not converged"]:
            parts[-1] += f", {counts['not converged']} not converged"
    dead = sum(1 for u in units if u.dead)
    if dead:
        parts.append(f"{dead} with dead channels")
    fc = report.function_check
    if fc is not None:
        verdict = (f"within tolerance {fc.tolerance:g}" if fc.enforced
                   else "not enforced: units moved freely")
        parts.append(f"change of the {getattr(fc, 'scope', 'outputs')} on {fc.images} "
                     f"held-out images {fc.rel_change:.1e} ({verdict})")
    if report.output_std is not None and report.command == "rescale":
        gain = report.output_contrast_gain
        parts.append(f"output std on {heldout_words(report.data)} {report.output_std:.3g}"
                     + (f" (contrast gain {gain:.2g})" if gain is not None else ""))
    return "; ".join(parts)


def _names(names: list[str], count: int, limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({count - limit} more)" if count > limit else "")


ARCH_FROM = {"metadata": "ckptinit metadata", "config.json": "config.json beside the file",
             "checkpoint": "the checkpoint's 'arch' entry", "option": "--arch"}


def source_line(source: dict) -> str | None:
    """What was loaded from where: the wrappers unwrapped, and the keys missing or unused."""
    if not source:
        return None
    name, arch = source.get("source", ""), source.get("architecture", "")
    if not source.get("pretrained"):
        return f"source: {name}, fresh weights"
    what = f"source: {name}"
    if source.get("file_format"):
        what += f" ({source['file_format']})"
    if source.get("revision"):
        what += f" @ {source['revision']}"
    where = ARCH_FROM.get(source.get("arch_from"))
    what += f", {arch}" + (f" from {where}" if where else "")
    loaded = f"{source.get('loaded_count', 0)} tensors loaded"
    if source.get("nested_key"):
        loaded += f" from '{source['nested_key']}'"
    if source.get("stripped_prefixes"):
        loaded += " with prefix " + ", ".join(f"'{p}'" for p in source["stripped_prefixes"]) \
            + " stripped"
    if source.get("key_map"):
        loaded += "; keys renamed " + ", ".join(f"'{a}'→'{b}'" for a, b in
                                                 source["key_map"].items())
    parts = [what, loaded]
    if source.get("missing_count"):
        parts.append(f"{source['missing_count']} missing, left fresh "
                     f"({_names(source.get('missing_keys', []), source['missing_count'])})")
    if source.get("dropped_count"):
        parts.append(f"{source['dropped_count']} not used "
                     f"({_names(source.get('dropped_keys', []), source['dropped_count'])})")
    return "; ".join(parts)


def print_report(report: RunReport, console: Console) -> None:
    """The unit table, the library's notes, and one summary line."""
    table, hidden = unit_table(report, console.width)
    console.print(table)
    if hidden:
        console.print(f"[dim]columns left out at this width: {', '.join(hidden)} "
                      "(widen the terminal, or see the JSON report)[/]", highlight=False)
    source = source_line(report.source)
    for line in ([source] if source else []) + list(report.notes):
        console.print(Text("• ", style="dim") + Text(line), highlight=False)
    console.print(f"[bold]Summary:[/] {summary_line(report)}", highlight=False)


# --------------------------------------------------------------------------- info


def info_dict(info) -> dict:
    """`CheckpointInfo` as JSON-ready data (what `ckptinit info --json` prints)."""
    return dataclasses.asdict(info)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n} bytes"


def _options_text(raw: str) -> str:
    try:
        opts = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(opts, dict):
        return raw
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(opts.items()))


# the data_* keys summed up in the one `data` line of the provenance
DATA_SHOWN = ("source", "kind", "split", "config", "revision", "images", "holdout", "distinct",
              "augmented", "skipped")


def _data_text(data: dict[str, str]) -> str | None:
    """The calibration data in one line, from the provenance's data_* keys (no prefix)."""
    if "source" not in data:
        return None
    kind = data.get("kind")
    text = data["source"] + (f" ({kind})" if kind and kind != data["source"] else "")
    for key in ("split", "config", "revision"):
        if data.get(key):
            text += f", {key} {data[key]}"
    counts = [f"{data.get('images', '?')} images + {data.get('holdout', '?')} holdout"]
    for key in ("distinct", "augmented", "skipped"):
        if key in data:
            counts.append(f"{data[key]} {key}")
    return f"{text}: {', '.join(counts)}"


def print_info(info, console: Console) -> None:
    """Short summary of a checkpoint file: what it holds, what made it, other metadata."""
    header = md.read_header(info.metadata, warn=False)  # read_info warned already
    meta, prov = header.metadata, header.provenance
    sections: list[tuple[str, list[tuple[str, str]]]] = []

    rows: list[tuple[str, str]] = []
    rows.append(("format", f"{info.format}, {_size(info.file_size)}"))
    rows.append(("tensors", f"{info.tensor_count:,} ({info.parameter_count:,} parameters)"))
    dtypes = sorted(info.dtypes.items(), key=lambda kv: -kv[1])
    rows.append(("dtypes", ", ".join(f"{name} ×{n}" for name, n in dtypes) or "-"))
    if info.architecture:
        where = {"metadata": "ckptinit metadata", "config.json": "config.json beside the file",
                 "checkpoint": "the checkpoint's 'arch' entry"}.get(info.arch_from, info.arch_from)
        rows.append(("architecture", f"{info.architecture} (from {where})"))
    else:
        rows.append(("architecture", "unknown (pass --arch NAME to rescale or measure it)"))
    rows.append(("num_classes", "-" if info.num_classes is None else str(info.num_classes)))
    if info.model_args:
        rows.append(("model_args", repr(info.model_args)))
    if info.sections:
        rows.append(("sections", ", ".join(f"{k or '(top level)'}: {n} tensors"
                                           for k, n in info.sections.items())))
    if info.common_prefix:
        rows.append(("key prefix", info.common_prefix))
    sections.append((str(info.path), rows))

    if prov:
        rows = []
        shown = {md.VERSION, md.METHOD, md.SOURCE, md.SOURCE_REVISION, md.SEED, md.OPTIONS}
        rows.append(("version", prov.get(md.VERSION, "-")))
        rows.append(("method", prov.get(md.METHOD, "-")))
        source = prov.get(md.SOURCE, "-")
        if prov.get(md.SOURCE_REVISION):
            source += f" @ {prov[md.SOURCE_REVISION]}"
        rows.append(("source", source))
        data = _data_text(header.data())
        if data:
            rows.append(("data", data))
            shown |= {md.DATA_PREFIX + k for k in DATA_SHOWN}
        rows.append(("seed", prov.get(md.SEED, "-")))
        if md.OPTIONS in prov:
            rows.append(("options", _options_text(prov[md.OPTIONS])))
        rows += [(key, prov[key]) for key in sorted(k for k in prov if k not in shown)]
        sections.append(("ckptinit provenance", rows))
    rest = {k: v for k, v in meta.items() if k not in prov and k not in md.REBUILD_KEYS}
    if rest:
        sections.append(("other metadata", [(k, rest[k]) for k in sorted(rest)]))

    width = max(len(k) for _, rows in sections for k, _ in rows) + 2
    for title, rows in sections:
        console.print(Text(title, style="bold underline"), soft_wrap=True)
        for key, value in rows:
            line = Text(f"  {key:<{width}}", style="bold")
            line.append(str(value))
            console.print(line, soft_wrap=True)

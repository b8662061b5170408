"""Rich rendering of a `DryRunPlan` (`ckptinit rescale --dry-run`): the units in execution
order with what each would get, the estimated passes and peak memory, what would be
written."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..report import DryRunPlan, UnitPlan
from .render import STATUS_STYLE, fmt_num, relative, source_line

BETWEEN_STYLE = {"movable": "green", "balanced": "green", "pinned": STATUS_STYLE["pinned"],
                 "excluded": STATUS_STYLE["excluded"], "off": "dim"}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{fmt_num(n / scale)} {unit}"
    return f"{int(n)} B"


def _between(u: UnitPlan) -> str:
    if u.slices:
        return u.between + " (" + ",".join(f"{s['slice']}:{s['status']}" for s in u.slices) + ")"
    return u.between


def _why(u: UnitPlan) -> str:
    parts = [u.reason] if u.reason else []
    if u.compensation and u.between == "movable":
        parts.insert(0, relative(u.compensation, u.name))
    skipped = u.within_note if u.within_note and u.within_note.startswith("skipped") else None
    return "; ".join(p for p in parts + [u.draw_note, skipped] if p) or "-"


def unit_plan_table(plan: DryRunPlan) -> Table:
    """One row per unit in execution order: weights, within-layer, between-layer, why."""
    name = plan.source.get("source", "")
    table = Table(title=f"ckptinit rescale --dry-run: {name}", box=box.SIMPLE_HEAD,
                  header_style="bold", pad_edge=False, show_edge=False, collapse_padding=True,
                  title_justify="left")
    calls = any(u.calls > 1 for u in plan.units)
    for header, justify in (("#", "right"), ("unit", "left"), ("kind", "left"),
                            ("shape", "left"), *((("calls", "right"),) if calls else ()),
                            ("weights", "left"), ("within", "left"), ("between", "left")):
        table.add_column(header, justify=justify, no_wrap=True)
    table.add_column("compensation / why", overflow="fold")
    for i, u in enumerate(plan.units):
        row: list[str | Text] = [str(i), u.name, u.kind, "x".join(map(str, u.shape))]
        if calls:
            row.append(str(u.calls))
        row += [u.draw, "yes" if u.within else "no",
                Text(_between(u), style=BETWEEN_STYLE.get(u.between, "")), _why(u)]
        table.add_row(*row)
    return table


def pass_table(plan: DryRunPlan) -> Table:
    table = Table(title="estimated passes through the model (≤: an upper bound)",
                  box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False,
                  collapse_padding=True, title_justify="left")
    for header, justify in (("stage", "left"), ("forward", "right"), ("backward", "right"),
                            ("images each", "right")):
        table.add_column(header, justify=justify, no_wrap=True)
    table.add_column("note", overflow="fold")
    bound = any(p.bound for p in plan.passes)
    for p in plan.passes:
        mark = "≤" if p.bound else ""
        table.add_row(p.stage, f"{mark}{p.forwards}", f"{mark}{p.backwards}" if p.backwards
                      else "-", str(p.images), p.note or "")
    mark = "≤" if bound else ""
    table.add_row(Text("total", style="bold"), f"{mark}{plan.forwards}",
                  f"{mark}{plan.backwards}", "", "")
    return table


def data_line(plan: DryRunPlan) -> str:
    d = plan.data
    text = f"data: {d.get('data', '?')}"
    if d.get("available") is not None:
        text += f" ({d['available']} available"
        need = d["images"] + d["holdout"]
        text += f"; {need - d['available']} more made by random crops and flips)" \
            if d["available"] < need else ")"
    size = "x".join(map(str, d.get("input_size", [])))
    return (f"{text}; {d['images']} calibration + {d['holdout']} holdout images at {size}, "
            f"--batch-size {d['batch_size']}: {d['batches']} batch(es); no image decoded")


def print_plan(plan: DryRunPlan, console: Console) -> None:
    """The unit table, the passes, the memory estimate, what would be written, the notes."""
    bullet = Text("• ", style="dim")
    console.print(unit_plan_table(plan))
    counts = {s: sum(u.between == s for u in plan.units) for s in ("movable", "pinned",
                                                                   "excluded")}
    within = sum(u.within for u in plan.units)
    console.print(f"{len(plan.units)} units: {within} within-layer, "
                  + ", ".join(f"{n} {s}" for s, n in counts.items()), highlight=False)
    console.print(pass_table(plan))
    mem = plan.memory
    console.print(Text(f"estimated peak memory: about {fmt_bytes(mem['peak_bytes'])} "
                       f"({mem['peak_phase']}, {mem['batch_images']} images a batch); "
                       f"parameters {fmt_bytes(mem['parameter_bytes'])}, per image "
                       f"{fmt_bytes(mem['per_image']['produced'])} of activations", style="bold"))
    console.print(Text("  how: ", style="dim") + Text(mem["how"]))
    source = source_line(plan.source)
    for line in ([source] if source else []) + [data_line(plan)] + list(plan.notes):
        console.print(bullet + Text(line), highlight=False)
    for path in plan.would_write:
        console.print(bullet + Text(f"would write {path}"), highlight=False)
    if plan.would_refuse:
        console.print(bullet + Text(f"the run would refuse: {plan.would_refuse}",
                                    style="yellow"), highlight=False)
    console.print("[bold]Dry run:[/] no image decoded, nothing written.", highlight=False)

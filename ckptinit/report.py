"""Result dataclasses and their JSON (output/plots.py draws them; the CLI renders the table)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._helpers import json_default

MOVABLE = ("ok", "not converged", "tied", "limited")  # statuses of units the step may move


@dataclass
class UnitRecord:
    """Everything ckptinit measured and did for one unit."""

    name: str
    kind: str
    shape: tuple[int, ...]
    calls: int = 1
    action: str = "none"  # what the within-layer step did: none | normalize | <draw>+normalize
    draw: str | None = None
    draw_reason: str | None = None
    mean_before: float | None = None  # averages over channels of the channel mean / std
    std_before: float | None = None
    mean_after: float | None = None
    std_after: float | None = None
    # on the held-out images after both steps, eval mode (not the moments the step fitted)
    mean_heldout: float | None = None
    std_heldout: float | None = None
    scale: float | None = None  # geometric mean of the per-channel weight scales applied
    dead: int = 0  # channels with (near) zero variance
    status: str = "ok"  # ok | dead | skipped | not called | fallback | pinned | excluded | ...
    note: str | None = None
    # between-layer step
    rate_before: float | None = None
    rate_after: float | None = None
    # after the step, on the held-out images with other gradient draws (SGD rates only)
    rate_heldout: float | None = None
    r: float | None = None  # cumulative weight scale applied by the between-layer step
    compensation: str | None = None
    between_status: str | None = None  # ok | pinned | excluded | balanced | tied | limited
    between_reason: str | None = None  # | not converged
    slices: list[dict] | None = None  # fused q/k/v projections: rates and status per slice


@dataclass
class FunctionCheck:
    """Relative change of the model's outputs on held-out images, before vs after."""

    rel_change: float
    tolerance: float
    enforced: bool  # False when the user allowed the function to change (or units moved freely)
    images: int
    scope: str = "outputs"  # or the features read by a new, freely moving head


def heldout_words(data: dict) -> str:
    """What the run's held-out checks measured: distinct images never used for fitting, or,
    when there were too few, other crops of the calibration images (a weaker check)."""
    return ("other crops of the calibration images" if data.get("holdout_overlaps")
            else "held-out images")


@dataclass
class RunReport:
    """One run: what went in, what each unit got, and what was checked."""

    version: str
    command: str
    method: str | None = None  # one line: the steps that ran and their main parameters
    command_line: str | None = None  # the command that made it, no token, paths as names
    source: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    units: list[UnitRecord] = field(default_factory=list)
    never_called: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    within_passes: int = 0
    within_correction: float | None = None  # largest per-channel correction of the last pass
    between_iterations: int = 0
    converged: bool | None = None
    # no function-preserving move brings the spread below this: the starting spread of the
    # widest group of units that move only together, and that group
    rate_floor: float | None = None
    rate_floor_units: list[str] = field(default_factory=list)
    function_check: FunctionCheck | None = None
    output_std: float | None = None  # the output's std on held-out images, eval mode
    # d log(output std) / d log(contrast) there: 1 scale-equivariant, 0 behind a final norm
    output_contrast_gain: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # device, peak_rss_bytes (process), and on CUDA device_name, peak_device_bytes (this run);
    # from the CLI also spool_bytes/spool_dtype (the calibration images on disk)
    resources: dict = field(default_factory=dict)

    def unit(self, name: str) -> UnitRecord:
        return next(u for u in self.units if u.name == name)

    def rate_spread(self, which: str = "after", movable_only: bool = True) -> float | None:
        """max/min change rate over the unit slices the between-layer step may move (or all
        that receive gradient); `which` is before, after or heldout."""
        keep = MOVABLE if movable_only else MOVABLE + ("pinned", "balanced")
        rates = []
        for u in self.units:  # a fused q/k/v projection counts per slice
            parts = u.slices or [{"status": u.between_status,
                                  f"rate_{which}": getattr(u, f"rate_{which}")}]
            rates += [p.get(f"rate_{which}") for p in parts if p["status"] in keep]
        rates = [r for r in rates if r is not None and math.isfinite(r) and r > 0]
        return max(rates) / min(rates) if rates else None

    @property
    def rate_spread_heldout(self) -> float | None:
        """The movable units' spread re-measured on held-out images with other draws: the
        step's own "after" spread is small by construction, this one is not."""
        return self.rate_spread("heldout")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rate_spread_before"] = self.rate_spread("before")
        d["rate_spread_after"] = self.rate_spread("after")
        d["rate_spread_heldout"] = self.rate_spread_heldout
        d["rate_spread_all_before"] = self.rate_spread("before", movable_only=False)
        d["rate_spread_all_after"] = self.rate_spread("after", movable_only=False)
        return d

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=json_default) + "\n")


@dataclass
class UnitPlan:
    """What a run would do to one unit (`ckptinit rescale --dry-run`)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    calls: int = 1
    origin: str = "fresh"  # fresh | loaded
    draw: str = "kept"  # kept (loaded weights) | timm init (fresh, not redrawn) | <draw>
    draw_note: str | None = None  # e.g. the fallback a data-dependent draw would take
    within: bool = False
    within_note: str | None = None
    between: str = "off"  # movable | balanced | pinned | excluded | off
    compensation: str | None = None  # what absorbs its move, or the units it moves with
    reason: str | None = None  # why pinned, excluded or approximate
    slices: list[dict] | None = None  # fused q/k/v projections: status per slice


@dataclass
class PassEstimate:
    """One stage's passes through the model: calls of forward (each on `images` images)."""

    stage: str
    forwards: int
    backwards: int = 0
    images: int = 0  # per call
    bound: bool = False  # True: an upper bound (the stage may stop early)
    note: str | None = None


@dataclass
class DryRunPlan:
    """The plan of a run: every unit in execution order, estimated passes and peak memory;
    made from one small traced pass, without reading calibration images or writing files."""

    version: str
    source: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # data, kind, images, holdout, batches, input size
    units: list[UnitPlan] = field(default_factory=list)
    never_called: list[str] = field(default_factory=list)
    passes: list[PassEstimate] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # bytes by component, peak, how estimated
    would_write: list[str] = field(default_factory=list)
    would_refuse: str | None = None  # what the run itself would refuse about the outputs
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def forwards(self) -> int:
        return sum(p.forwards for p in self.passes)

    @property
    def backwards(self) -> int:
        return sum(p.backwards for p in self.passes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(forwards=self.forwards, backwards=self.backwards)
        return d

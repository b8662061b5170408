"""Option objects shared by the library stages; the CLI builds exactly one of each."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError

WEIGHT_DRAWS = ("keep", "gaussian", "orthogonal", "pca", "kmeans")
OPTIMIZERS = ("sgd", "adam")  # whose relative step the between-layer step equalises
RESIDUAL_INITS = ("data", "timm")  # residual branches that start at zero (fresh nets)
MEMORY_FORMATS = ("auto", "channels-last", "contiguous")  # layout.py
FRESH_DRAWS, LOADED_DRAWS = 2, 8  # RescaleOptions.draws


@dataclass
class RescaleOptions:
    """What `ckptinit.rescale` does. `None` means: decide from the source (DESIGN 1.3)."""

    within: bool | None = None  # None: within-layer step for fresh units only
    between: bool = True
    weights: str | None = None  # None: gaussian for fresh units, keep for loaded ones
    beta: float = 0.1
    head_std: float = 0.5  # std of the model outputs after the within step (convergence.py)
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    patch_budget: int = 16384  # patches per unit (and group) for pca/kmeans draws
    # between-layer step
    # (batch, g) draws per change-rate estimate, reused every iteration; None: FRESH_DRAWS on
    # a fresh net, LOADED_DRAWS where any unit is loaded (draws())
    grad_batches: int | None = None
    damping: float = 1.0
    tol: float = 0.01
    iters: int = 10
    allow_function_change: bool = False
    function_tol: float = 1e-4
    optimizer: str = "sgd"  # sgd: ||dL/dW|| / ||W||; adam: lr / RMS(W)
    residual_init: str = "data"  # data: zero-started branches get a share; timm: kept
    memory_format: str = "auto"  # the passes' layout (layout.py): channels-last for conv
    # nets on the CPU, contiguous elsewhere (benchmarks/README.md, speed.py)

    def draws(self, loaded: bool) -> int:
        """Gradient draws per change-rate estimate. A fresh net's rates spread over decades
        and 2 draws place them well enough; on loaded weights the promise is per unit (none
        ends further from the mean than it started), and units that start near the mean
        are moved by the estimate's noise unless it is smaller (benchmarks/README.md, "More
        gradient draws on loaded weights")."""
        if self.grad_batches is not None:
            return self.grad_batches
        return LOADED_DRAWS if loaded else FRESH_DRAWS

    def within_draws(self, units: list[str], fresh: set[str]) -> dict[str, str]:
        """The units the within-layer step normalises, each with its weight draw (DESIGN 1.3:
        by default fresh units get a gaussian draw, loaded ones are not touched)."""
        if self.within is None and self.weights is None:
            units = [n for n in units if n in fresh]
        elif self.within is False:
            units = []
        return {n: self.weights or ("gaussian" if n in fresh else "keep") for n in units}

    def check(self) -> RescaleOptions:
        """Refuse values the method cannot run with (one place for the CLI and the API)."""
        for flag, value, allowed in (("--weights", self.weights, WEIGHT_DRAWS),
                                     ("--optimizer", self.optimizer, OPTIMIZERS),
                                     ("--residual-init", self.residual_init, RESIDUAL_INITS),
                                     ("--memory-format", self.memory_format, MEMORY_FORMATS)):
            if value is not None and value not in allowed:
                raise UsageError(f"Unknown {flag} '{value}'; use one of {', '.join(allowed)}.")
        if self.weights not in (None, "keep") and self.within is False:
            raise UsageError("--weights draws weights for the within-layer step; it cannot be "
                             "combined with --no-within.")
        if not 0 < self.damping <= 1:
            raise UsageError(f"--damping must be in (0, 1], got {self.damping:g}.")
        if not self.head_std > 0:
            raise UsageError(f"--head-std must be positive, got {self.head_std:g}.")
        if self.grad_batches is not None and self.grad_batches < 1:
            raise UsageError(f"--grad-batches must be at least 1, got {self.grad_batches}.")
        if not self.tol > 0:
            raise UsageError(f"--tol must be positive, got {self.tol:g}.")
        return self


@dataclass
class SourceOptions:
    """How a SOURCE becomes a model."""

    arch: str | None = None
    token: str | None = None  # Hugging Face token for hf-hub: sources (None: the login)
    num_classes: int | None = None
    model_args: dict = field(default_factory=dict)
    trust_pickle: bool = False
    use_ema: bool = False
    strip_prefix: list[str] = field(default_factory=list)
    key_map: dict[str, str] = field(default_factory=dict)


@dataclass
class CalibrationOptions:
    """Where calibration images come from and how they are preprocessed."""

    data: str = "samples"
    images: int = 64
    holdout: int = 16  # extra images never used for fitting, for checks
    seed: int = 0
    split: str | None = None
    config: str | None = None
    revision: str | None = None
    image_column: str | None = None
    token: str | None = None
    shuffle_buffer: int = 1000
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    workers: int | None = None


@dataclass
class PublishOptions:
    """What a Hub-ready folder (-o FOLDER) says beyond the run: its licence, the repository
    it is meant for (the card's loading code), and the command that made it."""

    license: str | None = None
    repo_id: str | None = None
    command_line: str | None = None

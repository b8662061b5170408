"""Preprocessing: the model's timm eval transform with the user's overrides, and the seeded
random crops and flips that fill in when there are fewer images than asked for.

Images are kept as *records* (what the spool stores): the uint8 pixels the transform has
before ToTensor/Normalize when its steps before them are PIL resizes and crops (exact:
`PixelNormalizer` repeats ToTensor + Normalize bit for bit), else the float32 tensor.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..options import CalibrationOptions

CROP_SCALE = (0.35, 1.0)  # area fraction of the random crops that fill in for missing images
CROP_RATIO = (3 / 4, 4 / 3)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# PIL -> PIL steps of timm's eval transforms: their output is uint8 pixels, stored exactly
PIXEL_STEPS = ("Resize", "CenterCrop", "ResizeKeepRatio", "CenterCropOrPad")


def resolve_data_config(model: nn.Module, options: CalibrationOptions) -> dict:
    """The model's timm eval data config with the user's overrides, validated.

    Returns input_size (C, H, W), interpolation, mean, std, crop_pct, crop_mode. Models
    built for one input channel get a one-channel config (images are then read as grey).
    """
    import timm.data

    cfg = dict(timm.data.resolve_model_data_config(model))
    channels = _input_channels(model) or int(cfg["input_size"][0])
    _, height, width = cfg["input_size"]
    if options.input_size is not None:
        if int(options.input_size) < 1:
            raise UsageError(f"--input-size must be a positive number of pixels, got "
                             f"{options.input_size}.")
        height = width = int(options.input_size)
    cfg["input_size"] = (channels, int(height), int(width))
    for key in ("mean", "std"):
        value = getattr(options, key)
        value = tuple(float(v) for v in (value if value is not None else cfg[key]))
        if len(value) != channels:
            if len(value) == 3 and channels == 1:  # grey model, RGB statistics: average them
                value = (sum(value) / 3,)
            elif len(value) == 1:
                value = value * channels
            else:
                raise UsageError(f"--{key} needs {channels} values for this model, got "
                                 f"{len(value)}.")
        cfg[key] = value
    if any(s <= 0 for s in cfg["std"]):
        raise UsageError(f"--std values must be positive, got {cfg['std']}.")
    if options.crop_pct is not None:
        if not 0 < options.crop_pct <= 1:
            raise UsageError(f"--crop-pct must be in (0, 1], got {options.crop_pct}.")
        cfg["crop_pct"] = float(options.crop_pct)
    if options.interpolation is not None:
        if options.interpolation not in INTERPOLATIONS:
            raise UsageError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}; "
                             f"got '{options.interpolation}'.")
        cfg["interpolation"] = options.interpolation
    elif cfg.get("interpolation") not in INTERPOLATIONS:
        cfg["interpolation"] = "bicubic"  # e.g. 'random' is a training-only choice
    cfg.setdefault("crop_mode", "center")
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: cfg.get(k) for k in keys}


def _input_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first conv (timm's pretrained_cfg names it)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    module = None
    if name:
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(name)
    if module is None:
        module = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)),
                      None)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    return int(weight.shape[1] * getattr(module, "groups", 1))


class Preprocess:
    """The model's eval transform, plus seeded random crops for filling in missing images."""

    def __init__(self, cfg: dict) -> None:
        import timm.data
        from PIL import Image

        self.eval_transform = timm.data.create_transform(**cfg, is_training=False)
        channels, height, width = cfg["input_size"]
        if channels not in (1, 3):
            raise UsageError(f"The model takes {channels} input channels; calibration images "
                             "can only be read as RGB (3) or grey (1).")
        self.mode = "L" if channels == 1 else "RGB"
        self.size = (width, height)
        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                    "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
        self.resample = resample[cfg["interpolation"]]
        self.normalizer = PixelNormalizer(cfg["mean"], cfg["std"])
        self.pixel_steps = _pixel_steps(self.eval_transform, self.normalizer)
        self.record_shape = (int(channels), int(height), int(width))
        self.record_dtype = np.dtype(np.uint8 if self.pixel_steps is not None else np.float32)

    def evaluate(self, image: Any) -> torch.Tensor:
        return self.eval_transform(image).to(torch.float32).contiguous()

    def record(self, image: Any) -> np.ndarray:
        """The eval view as a record: uint8 pixels when exact, else the float32 tensor."""
        if self.pixel_steps is None:
            return self.evaluate(image).numpy()
        for step in self.pixel_steps:
            image = step(image)
        return self._pixels(image)

    def crop_record(self, image: Any, rng: random.Random) -> np.ndarray:
        """A seeded random crop (see `crop`) as a record."""
        pixels = self._pixels(self._crop_image(image, rng))
        if self.pixel_steps is None:
            return self.normalizer(torch.from_numpy(pixels)).numpy()
        return pixels

    def crop(self, image: Any, rng: random.Random) -> torch.Tensor:
        """RandomResizedCrop(scale=CROP_SCALE) + horizontal flip, drawn from `rng` only."""
        return self.normalizer(torch.from_numpy(self._pixels(self._crop_image(image, rng))))

    def to_tensor(self, records: np.ndarray) -> torch.Tensor:
        """Records (N, C, H, W) -> the float32 images the model reads (CPU)."""
        x = torch.from_numpy(records)
        return self.normalizer(x) if x.dtype == torch.uint8 else x.clone()

    def _crop_image(self, image: Any, rng: random.Random) -> Any:
        from PIL import Image

        box = _crop_box(image.size, rng)
        out = image.resize(self.size, self.resample, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def _pixels(self, image: Any) -> np.ndarray:
        """A PIL image in this mode and size -> (C, H, W) uint8."""
        if image.mode != self.mode or image.size != self.size:
            raise ValueError(f"preprocessed image is {image.mode} {image.size}, expected "
                             f"{self.mode} {self.size}")
        array = np.asarray(image, dtype=np.uint8)
        out = np.ascontiguousarray(array.reshape(array.shape[0], array.shape[1], -1)
                                   .transpose(2, 0, 1))
        return out if out.flags.writeable else out.copy()  # PIL's own buffer is read-only


class PixelNormalizer:
    """uint8 pixels -> (x / 255 - mean) / std in float32, on the pixels' device.

    The same operations in the same order as torchvision's ToTensor + Normalize, so the
    same bits on the CPU. 255 is a tensor on the pixels' device: CUDA turns a division by
    a Python number into a multiplication by its reciprocal, which can differ in the last
    bit. The constants are made once per device (no host transfer per batch).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            raise TypeError(f"PixelNormalizer takes uint8 pixels, got {pixels.dtype}")
        device = pixels.device
        if device not in self._constants:
            self._constants[device] = tuple(
                t.to(device) for t in (torch.tensor(255.0), self.mean, self.std))
        scale, mean, std = self._constants[device]
        return pixels.to(torch.float32).div_(scale).sub_(mean).div_(std)


def _pixel_steps(transform: Any, normalizer: PixelNormalizer) -> list | None:
    """The PIL steps before ToTensor + Normalize(mean, std), or None when the transform is
    not of that form (its output is then stored as float32)."""
    steps = list(getattr(transform, "transforms", [transform]))
    names = [type(s).__name__ for s in steps]
    if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") \
            or names[-1] != "Normalize" or any(n not in PIXEL_STEPS for n in names[:-2]):
        return None
    norm = steps[-1]
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(norm.std, dtype=torch.float32).flatten()
    if not (torch.equal(mean, normalizer.mean.flatten())
            and torch.equal(std, normalizer.std.flatten())):
        return None
    return steps[:-2]


def _crop_box(size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
    width, height = size
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, width - w)
            y = rng.randint(0, height - h)
            return (x, y, x + w, y + h)
    side = min(width, height)  # fallback: centre square
    x, y = (width - side) // 2, (height - side) // 2
    return (x, y, x + side, y + side)

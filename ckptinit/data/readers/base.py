"""What every reader hands to the calibration loop: candidates in seeded order (`Source`),
plus the helpers the dataset readers share (image-column detection, error mapping)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..._helpers import one_line
from ...errors import DataError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Candidate:
    """One image to try: `payload` is a path, bytes, a {bytes, path} dict or a PIL image."""

    label: str
    payload: Any


@dataclass
class Skip:
    label: str
    reason: str


@dataclass
class Source:
    """Resolved --data: candidates in seeded order, lazily produced, plus provenance."""

    kind: str
    resolved: str
    candidates: Iterable[Candidate]
    available: int | None = None
    streaming: bool = False
    split: str | None = None
    config: str | None = None
    revision: str | None = None
    image_column: str | None = None
    notes: list[str] = field(default_factory=list)


def column_from_features(features: Any) -> str | None:
    """The first `datasets.Image` column, preferring the usual names."""
    if not features:
        return None
    try:
        from datasets import Image as ImageFeature
    except Exception:
        return None
    found = [name for name, feat in features.items() if isinstance(feat, ImageFeature)]
    for preferred in ("image", "img", "jpg", "jpeg", "png", "webp"):
        if preferred in found:
            return preferred
    return found[0] if found else None


def column_from_example(example: dict) -> str | None:
    """Guess the image column from values: a PIL image, {bytes, path}, or image bytes."""
    from PIL import Image

    fallback = None
    for name, value in example.items():
        if isinstance(value, Image.Image):
            return name
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            if value.get("bytes") or str(value.get("path", "")).lower().endswith(
                    IMAGE_EXTENSIONS):
                return name
        if fallback is None and isinstance(value, (bytes, bytearray)) and _is_image_bytes(value):
            fallback = name
    return fallback


def _is_image_bytes(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def data_errors(what: str) -> Iterator[None]:
    """Turn unexpected reader failures of local datasets into one-line DataErrors."""
    try:
        yield
    except (DataError, UsageError):
        raise
    except Exception as e:
        raise DataError(f"{what}: {type(e).__name__}: {one_line(e, 200, tidy=False)}") from None


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No tqdm bars from `datasets` inside the library; restores the previous setting."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()

"""Decoding: any image payload (path, bytes, {bytes, path}, PIL image) -> a PIL image in
RGB or L, and an ordered thread-pool map whose results do not depend on the worker count."""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MIN_SIDE = 8  # pixels; smaller images carry no usable statistics once scaled up


def decode(payload: Any, mode: str) -> Any:
    """Any supported payload -> a PIL image in `mode` ('RGB' or 'L'). Raises on bad data,
    on images smaller than MIN_SIDE a side, and on decompression bombs (more pixels than
    PIL's MAX_IMAGE_PIXELS), before decoding their pixels."""
    from PIL import Image, ImageOps

    if payload is None:
        raise ValueError("no image in this row")
    if isinstance(payload, Image.Image):
        check_size(payload.size)
        return _to_mode(payload, mode)
    if isinstance(payload, dict):
        data, path = payload.get("bytes"), payload.get("path")
        if data:
            payload = data
        elif path:
            payload = Path(path)
        else:
            raise ValueError("empty image value")
    source = io.BytesIO(payload) if isinstance(payload, (bytes, bytearray, memoryview)) \
        else payload
    with Image.open(source) as image:
        check_size(image.size)  # from the header: nothing decoded yet
        image.load()  # truncated or corrupt files fail here, not later in a transform
        image = ImageOps.exif_transpose(image) or image
        return _to_mode(image, mode)


def check_size(size: tuple[int, int]) -> None:
    """Refuse an image too small to calibrate on, or one whose size is a decompression bomb."""
    from PIL import Image

    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(f"{width}x{height} pixels: a decompression bomb? (over PIL's limit of "
                         f"{limit:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"{width}x{height} pixels: too small (at least {MIN_SIDE} px a side)")


def _to_mode(image: Any, mode: str) -> Any:
    """Grey, 16-bit, palette, CMYK, alpha -> RGB (or L); transparency composited on white."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = float(array.max()) if array.size else 0.0
        scale = 255.0 / top if top > 255.0 else (255.0 if 0 < top <= 1.0 else 1.0)
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def imap_ordered(fn: Callable[[Any], Any], items: Iterable[Any], workers: int
                  ) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) in input order, at most 2*workers in flight; items read lazily here."""
    iterator = iter(items)
    if workers <= 1:
        for item in iterator:
            yield item, fn(item)
        return
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptinit-data")
    pending: deque = deque()
    try:
        for item in iterator:
            pending.append((item, executor.submit(fn, item)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, future = pending.popleft()
            result = future.result()
            for nxt in iterator:
                pending.append((nxt, executor.submit(fn, nxt)))
                break
            yield item, result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

"""The one copy of the small helpers several stages share (no torch, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def cut(text: str, limit: int) -> str:
    """`text`, shortened to at most `limit` characters with a trailing '...'."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(e: BaseException | str, limit: int = 300, *, tidy: bool = True) -> str:
    """An exception (or text) as one line of at most `limit` characters.

    With `tidy` (the model-source messages) the bold escapes some libraries put into their
    messages are dropped and an empty message names the exception instead; the
    calibration-data messages pass tidy=False and keep the text as it is.
    """
    text = str(e)
    if tidy:
        text = text.replace("\x1b[1m", "").replace("\x1b[0m", "")
    text = " ".join(text.split())
    if tidy:
        text = text or type(e).__name__
    return cut(text, limit)


def jsonable(value: Any, fallback: Callable[[Any], Any] | None = repr) -> Any:
    """Dicts (keys as str), lists and tuples rebuilt with JSON values, recursively.

    A value that is none of these and not a JSON scalar goes through `fallback` (repr by
    default); fallback=None leaves such values as they are.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v, fallback) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, fallback) for v in value]
    if fallback is None or value is None or isinstance(value, (str, int, float, bool)):
        return value
    return fallback(value)


def json_default(value: Any) -> Any:
    """For `json.dumps(default=...)`: sets as lists, anything else unknown as its str()."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def listing(names: list[str], limit: int = 2, prefix: str = "") -> str:
    """'prefix a, b +3': the first `limit` names and how many more ('' for none)."""
    if not names:
        return ""
    text = ", ".join(names[:limit]) + (f" +{len(names) - limit}" if len(names) > limit else "")
    return f"{prefix} {text}".strip()


def count(n: int, noun: str) -> str:
    """'1 image', '3 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"

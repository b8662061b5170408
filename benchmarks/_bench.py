"""Shared by the speed and GPU benchmarks: timing, whole processes with their own peak
memory, a local image folder big enough for --images 4096, the machine's description,
and the marked sections of benchmarks/README.md that the scripts rewrite."""

from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"


def sync(device) -> None:
    """Wait for the device, so that a timer measures its work (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_process(cmd: list[str], env: dict | None = None, timeout: float | None = None
                ) -> dict:
    """Run one whole process (made by `python_cmd`): wall seconds, its own peak RSS (the
    line _peak.py prints) and its exit code."""
    import tempfile
    import threading

    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=err, text=True)
        fired: list[bool] = []

        def stop() -> None:
            fired.append(True)
            proc.kill()

        killer = threading.Timer(timeout, stop) if timeout else None
        if killer:
            killer.start()
        proc.wait()
        seconds = time.perf_counter() - t
        if killer:
            killer.cancel()
        timed_out = bool(fired)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    found = re.findall(r"@@peak_rss_bytes (\d+)", stderr)
    rss = int(found[-1]) if found else None
    return {"seconds": None if timed_out else seconds, "peak_rss_bytes": rss,
            "rc": "timeout" if timed_out else proc.returncode,
            "stdout": stdout[-4000:], "stderr": stderr[-3000:]}


def python_cmd(*args: str) -> list[str]:
    """`python -m MODULE ...` or `python SCRIPT ...`, run under _peak.py."""
    return [sys.executable, str(ROOT / "benchmarks" / "_peak.py"), *args]


def last_json(stdout: str) -> dict | None:
    """The last line of a process's stdout that parses as a JSON object."""
    for line in reversed((stdout or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def make_image_folder(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (96, 320)
                      ) -> Path:
    """`count` JPEGs made of random crops of the shipped sample photos (sizes, aspect ratios
    and flips vary), for --data FOLDER runs with thousands of images. Kept if complete."""
    from PIL import Image

    from ckptinit.data import samples_dir

    folder.mkdir(parents=True, exist_ok=True)
    done = sorted(folder.glob("*.jpg"))
    if len(done) >= count:
        return folder
    photos = [Image.open(p).convert("RGB") for p in sorted(samples_dir().glob("*.jpg"))]
    rng = random.Random(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.randint(min(w, h) // 4, min(w, h))
        aspect = rng.uniform(0.75, 1.33)
        cw, ch = min(w, int(side * aspect)), min(h, side)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out_side = rng.randint(*size)
        crop = photo.crop((x, y, x + cw, y + ch)).resize(
            (out_side, max(8, int(out_side * ch / cw))), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def machine(device: str = "cpu") -> dict:
    """What the figures were measured on: cores, load, torch, and the card."""
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def replace_section(name: str, text: str, readme: Path = README) -> None:
    """Rewrite the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in the README
    (appended with its markers if they are missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = readme.read_text() if readme.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = head + block + tail
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    readme.write_text(body)


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"

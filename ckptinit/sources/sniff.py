"""What a file is, from its first bytes: a safetensors file, a torch zip archive or a
pickle, or else something to name in the refusal (empty, text, an HTML page, a Git LFS
pointer, an image, an archive...). Also checks a safetensors header against the file's
size, so that a truncated download or a header that lies is named as such."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SourceError

HEAD = 4096  # bytes read to tell the kinds apart
MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header

# Leading bytes of files people point ckptinit at by mistake, and what to call them.
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras/TensorFlow .h5 weights?)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (b"BZh", "a bzip2-compressed file (decompress it first)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file (decompress it first)"),
    (b"(\xb5/\xfd", "a zstd-compressed file (decompress it first)"),
    (b"7z\xbc\xaf'\x1c", "a 7-Zip archive (extract it first)"),
    (b"GGUF", "a GGUF file (llama.cpp weights)"),
    (b"%PDF", "a PDF document"),
)
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # torch.save, pre-zip

ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
    "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}  # fmt: skip


def sniff(p: Path) -> str:
    """'safetensors', 'zip' (torch.save) or 'pickle' (legacy torch.save, pickle.dump); any
    other content is refused with a SourceError that says what the file is."""
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(HEAD)
    except OSError as e:
        raise SourceError(f"Cannot read {p}: {e.strerror or e}") from e
    if size == 0:
        raise SourceError(f"{p.name} is empty (0 bytes): an interrupted download or copy? "
                          "Fetch it again.")
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    what = _what_else(head)
    if p.name.lower().endswith(".safetensors") and what is None:
        raise SourceError(f"{p.name} is not a valid safetensors file: it does not start with "
                          "a safetensors header (corrupt, or another format renamed); fetch "
                          "it again.")
    if what is None:
        raise SourceError(f"{p.name} is not a checkpoint: its content matches no known format "
                          "(corrupt, or another kind of file); pass a .safetensors file or a "
                          "torch.save checkpoint.")
    raise SourceError(f"{p.name} is {what}, not a checkpoint; pass a .safetensors file or a "
                      "torch.save checkpoint.")


def _what_else(head: bytes) -> str | None:
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (extract it first)"
    text = _as_text(head)
    if text is None:
        return None
    start = text.lstrip().lower()
    if start.startswith("version https://git-lfs"):
        return "a Git LFS pointer (run `git lfs pull`, or download the file itself)"
    if start.startswith(("<!doctype html", "<html", "<?xml", "<head")):
        return "an HTML page (a failed download or a login page?)"
    if start.startswith(("{", "[")):
        return "a JSON file (a config.json? pass the weights file, or the folder as local-dir:)"
    first = " ".join(text.split())[:40]
    return f"a text file (it starts with '{first}')"


def _as_text(head: bytes) -> str | None:
    """The bytes as text when they look like it: UTF-8, no NUL, mostly printable."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the read
            return None
        text = head[: e.start].decode("utf-8")
    printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
    return text if text and printable >= 0.95 * len(text) else None


def check_safetensors_header(p: Path) -> None:
    """Refuse a safetensors file whose header does not fit the file: truncated, a length or
    an offset past the end, or a tensor whose byte range disagrees with its dtype and shape."""
    size = p.stat().st_size
    with p.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise SourceError(f"{p.name} is corrupt: its safetensors header claims {n:,} bytes "
                              "(over the 100 MB limit); fetch it again.")
        if 8 + n > size:
            raise SourceError(f"{p.name} is truncated: its header alone needs {8 + n:,} bytes "
                              f"and the file has {size:,}; fetch it again.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise SourceError(f"{p.name} is corrupt: its safetensors header is not valid JSON "
                          f"({e.msg}); fetch it again.") from e
    if not isinstance(header, dict):
        raise SourceError(f"{p.name} is corrupt: its safetensors header is not a JSON object.")
    data = size - 8 - n
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], [int(d) for d in entry["shape"]]
            start, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SourceError(f"{p.name} is corrupt: the header entry of '{name}' lacks a "
                              "dtype, shape or data_offsets.") from e
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * ITEM_SIZES[dtype] if dtype in ITEM_SIZES else end - start
        if start < 0 or end < start or end - start != expected:
            raise SourceError(f"{p.name} is corrupt: its header gives '{name}' ({dtype} "
                              f"{tuple(shape)}, {expected:,} bytes) the byte range "
                              f"[{start:,}, {end:,}); fetch it again.")
        end_max = max(end_max, end)
    if end_max > data:
        raise SourceError(f"{p.name} is truncated: its header describes {end_max:,} bytes of "
                          f"tensors and the file holds {data:,}; fetch it again.")

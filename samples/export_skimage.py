"""Export the shipped calibration photos from scikit-image's bundled data (run once, by hand).

scikit-image is not a dependency of ckptinit: it is only needed to re-create `samples/`.
Usage: `pip install scikit-image && python samples/export_skimage.py`.
Every photo chosen is public domain or CC0 (see README.md beside this script); images whose
licence is unstated (for example `stereo_motorcycle`, `moon`, `page`) are left out.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# file stem -> skimage.data function; all bundled with scikit-image (no download)
PHOTOS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "chelsea": "chelsea",
    "rocket": "rocket",
    "hubble_deep_field": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "retina": "retina",
    "camera": "camera",
    "coins": "coins",
    "clock": "clock",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
}
MAX_SIDE = 512
QUALITY = 90


def main() -> None:
    import skimage.data

    out = Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    for stem, fn in PHOTOS.items():
        image = Image.fromarray(getattr(skimage.data, fn)())
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)  # keeps aspect ratio
        path = out / f"{stem}.jpg"
        image.save(path, "JPEG", quality=QUALITY, optimize=True)
        print(f"{path.name}: {image.size[0]}x{image.size[1]} {image.mode}")


if __name__ == "__main__":
    main()

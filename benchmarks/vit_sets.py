"""Why a fresh ViT's change rates do not carry over from one half of the sample photos to
the other: what differs between the halves inside the net.

`ckptinit rescale vit_tiny_patch16_224 --data <half A>` (default settings, 64 images), then
on 32 crops of A and of B (archs.py's crops and gradient draws, nothing of ckptinit's):
the spread over the movable units at the images' contrast x 0.8 to 1.1 (is it the input
scale?), and per block the attention logits' std, the softmax entropy over its maximum,
the share of the attention output's variance that is between images (its mean over the
tokens), and the std of the attention and MLP branch outputs.

    .venv/bin/python benchmarks/vit_sets.py --json benchmarks/results/archs/vit-sets.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archs  # noqa: E402
from photo_sets import calibrate  # noqa: E402

ARCH = "vit_tiny_patch16_224"


@torch.no_grad()
def blocks(model, x: torch.Tensor) -> list[dict]:
    h = model._pos_embed(model.patch_embed(x))
    out = []
    for b in model.blocks:
        n, at = b.norm1(h), b.attn
        B, N, C = n.shape
        q, k, _ = at.qkv(n).reshape(B, N, 3, at.num_heads, C // at.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        logits = (at.q_norm(q) * at.scale) @ at.k_norm(k).transpose(-2, -1)
        p = logits.softmax(-1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(N)
        a = b.ls1(at(n))
        image_share = a.mean(1).var(0).mean() / a.reshape(-1, C).var(0).mean()
        h = h + a
        f = b.ls2(b.mlp(b.norm2(h)))
        h = h + f
        out.append({"logit_std": round(logits.std().item(), 3),
                    "entropy": round(entropy.item(), 3),
                    "image_share": round(image_share.item(), 3),
                    "attn_std": round(a.std().item(), 3), "mlp_std": round(f.std().item(), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    paths = archs._sample_paths()
    sets = {"A": paths[::2], "B": paths[1::2]}
    with tempfile.TemporaryDirectory() as tmp:
        out, report, _ = calibrate(ARCH, sets["A"], Path(tmp), "A")
        model = timm.create_model(ARCH, pretrained=False)
        model.load_state_dict(load_file(str(out)))
    model.eval()
    keys, cfg = archs.movable_keys(report), model.pretrained_cfg
    rows = {}
    for name, ps in sets.items():
        x = archs.crops(archs._sample_photos(ps), 32, 224, cfg["mean"], cfg["std"], 4321)
        rows[name] = {
            "spread_at_contrast": {c: round(archs.spread(archs.rates(model, c * x, opts.draws,
                                                                      99), keys), 3)
                                   for c in (0.8, 0.9, 1.0, 1.1)},
            "blocks": blocks(model, x)}
        print(name, json.dumps(rows[name]["spread_at_contrast"]))
        for i, b in enumerate(rows[name]["blocks"]):
            print(f"  block {i:2d} " + " ".join(f"{k} {v}" for k, v in b.items()))
    if opts.json:
        opts.json.write_text(json.dumps({"command": " ".join(sys.argv), "calibrated_on": "A",
                                         "checked_on": rows}, indent=1))


if __name__ == "__main__":
    main()

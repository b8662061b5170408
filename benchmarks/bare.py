"""The floor a ckptinit job is compared with: build the model, read the same calibration
images (ckptinit's own reader, so the same crops; no hold-out), run one no-grad forward
pass over them, save the weights. No method code, no CLI.

    python benchmarks/bare.py resnet50 --images 128 --batch-size 128 -o /tmp/bare.safetensors
    python benchmarks/bare.py resnet18 --input-size 128 --images 64 --data FOLDER --no-save
    python benchmarks/bare.py resnet50 --channels-last -o /tmp/bare.safetensors

--channels-last runs the forward with the model's 4-D tensors channels-last (what ckptinit
does on the CPU for conv nets, ckptinit/layout.py) and saves them contiguous again.

Prints one JSON line: seconds of each stage, peak RSS, and on CUDA peak device memory.
"""

from __future__ import annotations

import argparse
import json
import time

t_start = time.perf_counter()

import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ckptinit.data import load_calibration  # noqa: E402
from ckptinit.device import peak_rss_bytes, resolve_device  # noqa: E402
from ckptinit.options import CalibrationOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--data", default="samples")
    ap.add_argument("--device", default="auto")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    t = {"imports": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    t["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib = load_calibration(model, CalibrationOptions(data=args.data, images=args.images,
                                                       holdout=0, input_size=args.input_size))
    t["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for batch in calib.batches(args.batch_size, device):
            model(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t["forward"] = time.perf_counter() - t0
    calib.close()
    t0 = time.perf_counter()
    if not args.no_save and args.output:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, args.output, metadata={"format": "pt"})
    t["save"] = time.perf_counter() - t0
    out = {"timings": t, "total_s": time.perf_counter() - t_start,
           "peak_rss_bytes": peak_rss_bytes(), "device": str(device)}
    if device.type == "cuda":
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

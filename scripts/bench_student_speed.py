#!/usr/bin/env python
"""CPU speed of candidate student networks relative to the teacher, measured before any training.

Each candidate is a dlib-family ResNet (:class:`facepipe.embed.dlib_resnet.DlibFaceResNet`,
fused affines, channels-last, as :class:`NetworkEmbedder` runs it) or MobileNetV2 at a
given input size. Teacher and candidates are timed *interleaved* in one process
(round-robin, best of ``--rounds``), so the speed ratios hold on a shared, noisy CPU.

    python scripts/bench_student_speed.py --threads 2 --json docs/student_speed.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: name -> (arch record, input size); blocks are (filters, downsample) in forward order.
CANDIDATES: dict[str, tuple[dict, int]] = {
    "teacher: dlib ResNet, 150 px": ({"backbone": "dlib_resnet"}, 150),
    "dlib ResNet, 112 px": ({"backbone": "dlib_resnet"}, 112),
    "slim-8 (1-2 blocks per level), 112 px": ({"backbone": "dlib_resnet", "blocks": [
        [32, False], [32, False], [64, True], [64, False], [128, True], [128, False], [256, True], [256, True]]}, 112),
    "slim-5 (1 block per level), 112 px": ({"backbone": "dlib_resnet", "blocks": [
        [32, False], [64, True], [128, True], [256, True], [256, True]]}, 112),
    "slim-5, 96 px": ({"backbone": "dlib_resnet", "blocks": [
        [32, False], [64, True], [128, True], [256, True], [256, True]]}, 96),
    "slim-4 (no 32-ch block), 112 px": ({"backbone": "dlib_resnet", "blocks": [
        [64, True], [128, True], [256, True], [256, True]]}, 112),
    "slim-5, 128 px": ({"backbone": "dlib_resnet", "blocks": [
        [32, False], [64, True], [128, True], [256, True], [256, True]]}, 128),
    "slim-8, 128 px": ({"backbone": "dlib_resnet", "blocks": [
        [32, False], [32, False], [64, True], [64, False], [128, True], [128, False], [256, True], [256, True]]}, 128),
    "slim-8 half width, 112 px": ({"backbone": "dlib_resnet", "stem": 16, "blocks": [
        [16, False], [16, False], [32, True], [32, False], [64, True], [64, False], [128, True], [128, True]]}, 112),
    "MobileNetV2, 112 px": ({"backbone": "mobilenet_v2"}, 112),
    "MobileNetV2, 96 px": ({"backbone": "mobilenet_v2"}, 96),
    "MobileNetV2, 80 px": ({"backbone": "mobilenet_v2"}, 80),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3, help="batches per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from facepipe.device import describe_machine
    from facepipe.embed.dlib_resnet import fuse_affines
    from facepipe.embed.network import build_network

    torch.set_num_threads(args.threads)
    nets = {}
    for name, (arch, size) in CANDIDATES.items():
        net = build_network(dict(arch, dim=128), pretrained=False).eval()
        if arch["backbone"] == "dlib_resnet":
            net = fuse_affines(net)
        net = net.to(memory_format=torch.channels_last)
        x = torch.rand(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        params = sum(p.numel() for p in net.parameters())
        nets[name] = (net, x, params)
    best = {n: 0.0 for n in nets}
    with torch.inference_mode():
        for n, (net, x, _) in nets.items():
            net.forward_unnormalised(x)  # warm-up
        for r in range(args.rounds):
            for n, (net, x, _) in nets.items():
                t = time.perf_counter()
                for _ in range(args.batches):
                    net.forward_unnormalised(x)
                best[n] = max(best[n], args.batch * args.batches / (time.perf_counter() - t))
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    teacher = best[next(iter(nets))]
    rows = [{"name": n, "input": CANDIDATES[n][1], "arch": CANDIDATES[n][0], "params": nets[n][2],
             "faces_per_s": round(best[n], 1), "speedup_vs_teacher": round(best[n] / teacher, 2)} for n in nets]
    print(f"| candidate | input | params | CPU faces/s (batch {args.batch}, {args.threads} threads) | × teacher |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['input']} | {r['params'] / 1e6:.2f} M | {r['faces_per_s']:.0f} | "
              f"{r['speedup_vs_teacher']:.2f} |")
    if args.json:
        meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                "machine": describe_machine(), "threads": args.threads,
                "method": "forward pass only, random input, interleaved round-robin, best of rounds"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

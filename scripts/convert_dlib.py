#!/usr/bin/env python
"""Convert dlib's public-domain face ResNet into a facepipe embedder checkpoint (no dlib needed).

Reads ``dlib_face_recognition_resnet_model_v1.dat`` from the installed PyPI package
``face_recognition_models`` (or ``--dat``) with facepipe's numpy reader
(:mod:`facepipe.embed.dlib_format`, which checks the whole file against dlib's topology
and consumes every byte), loads it into the torch module of
:mod:`facepipe.embed.dlib_resnet` and writes a self-describing checkpoint: architecture,
150×150 ``dlib-chip-5pt`` alignment, dlib's input normalisation ``(pixel − mean) / 256``
with the file's means, and the provenance record (author, licence, package, SHA-256).

    python scripts/convert_dlib.py --out runs/dlib_port.pt            # float32: exact port
    python scripts/convert_dlib.py --out runs/dlib_port_fp16.pt --fp16

``load_embedder("dlib-port")`` does the same conversion in memory; with ``--check`` the
script also compares the result with dlib's own descriptors of the committed test chips
(``tests/fixtures/dlib_port``), and with dlib itself when it is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    ap.add_argument("--dat", type=Path, default=None, help="dlib model file [face_recognition_models' copy]")
    ap.add_argument("--fp16", action="store_true", help="store fp16 weights (half the size, ~1e-3 relative error)")
    ap.add_argument("--check", action="store_true", help="compare with dlib's descriptors of the fixture chips")
    args = ap.parse_args(argv)

    from facepipe.embed.network import NetworkEmbedder, save_checkpoint
    from facepipe.embed.port import port_checkpoint
    from facepipe.errors import FacepipeError

    try:
        ck = port_checkpoint(args.dat, dtype="float16" if args.fp16 else "float32")
    except FacepipeError as exc:
        print(f"convert_dlib: {exc}", file=sys.stderr)
        return 2
    save_checkpoint(ck, args.out)
    emb = NetworkEmbedder.from_checkpoint(args.out, device="cpu")
    report = {"out": str(args.out), "bytes": args.out.stat().st_size, "embedder_id": emb.embedder_id,
              "registry_name": ck["registry_name"], "provenance": ck["provenance"],
              "preprocess": ck["preprocess"]}
    if args.check:
        import cv2

        fx = ROOT / "tests" / "fixtures" / "dlib_port"
        chips = np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(fx / "chips.png")), cv2.COLOR_BGR2RGB)
                                     .reshape(-1, 150, 150, 3))
        desc = np.array(json.loads((fx / "descriptors.json").read_text())["descriptors"], np.float32)
        ref = desc / np.linalg.norm(desc, axis=1, keepdims=True)
        report["max_abs_diff_vs_fixture"] = float(np.abs(emb.embed(chips) - ref).max())
        try:
            from facepipe.embed.dlib_peer import DlibEmbedder

            report["max_abs_diff_vs_live_dlib"] = float(np.abs(emb.embed(chips) - DlibEmbedder().embed(chips)).max())
        except (ImportError, FacepipeError) as exc:
            report["live_dlib"] = f"not checked ({exc})"
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

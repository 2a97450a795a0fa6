"""Start-up time of the facepipe command line (issue 11 item 8).

Runs each case in a fresh interpreter, interleaved round by round so a shared machine's
load hits every case alike, and reports the median wall time and CPU time (user + sys:
far less sensitive to other processes than wall time). Cases:

* ``python -c pass`` and ``import numpy`` / ``import torch``: the floors;
* ``facepipe --help``, ``gallery list`` and ``gallery info`` on a small gallery;
* ``facepipe detect astronaut.png`` (first detection, MTCNN), as shipped, and with
  torchvision and facenet_pytorch imported the ordinary way first (what it cost before
  :mod:`facepipe.fastimport`).

    python scripts/bench_startup.py --rounds 5 --json docs/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cli(argv: list[str], pre: str = "") -> list[str]:
    code = (f"{pre}\nimport sys\nfrom facepipe.cli import main\nsys.argv = ['facepipe'] + {argv!r}\n"
            "try:\n    main()\nexcept SystemExit as e:\n    sys.exit(e.code)\n")
    return [sys.executable, "-c", code]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {out.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every case")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    import numpy as np
    from skimage import data

    from facepipe.device import describe_machine
    from facepipe.gallery import Gallery

    tmp = Path(tempfile.mkdtemp(prefix="fp_startup_"))
    photo = tmp / "astronaut.png"
    from PIL import Image

    Image.fromarray(data.astronaut()).save(photo)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(100, 128)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    with Gallery.edit(tmp / "g", embedder_id="bench@0", dim=128) as g:
        g.add(v, [f"person{i // 4}" for i in range(100)])

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import numpy": [sys.executable, "-c", "import numpy"],
        "import torch": [sys.executable, "-c", "import torch"],
        "facepipe --help": _cli(["--help"]),
        "facepipe gallery list": _cli(["gallery", "list", "-g", str(tmp / "g")]),
        "facepipe gallery info": _cli(["gallery", "info", "-g", str(tmp / "g")]),
        "facepipe detect (first detection)": _cli(["detect", str(photo)]),
        "facepipe detect, ordinary facenet_pytorch import": _cli(
            ["detect", str(photo)], pre="import torchvision, facenet_pytorch"),
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, cmd in cases.items():
            samples[name].append(_run(cmd, env))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = {}
    for name, s in samples.items():
        rows[name] = {"wall_s": round(statistics.median(w for w, _ in s), 3),
                      "cpu_s": round(statistics.median(c for _, c in s), 3),
                      "wall_all": [round(w, 3) for w, _ in s], "cpu_all": [round(c, 3) for _, c in s]}
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    report = {"command": "python " + " ".join(sys.argv), "machine": describe_machine(),
              "date": time.strftime("%Y-%m-%d"), "loadavg_at_end": load, "threads": args.threads,
              "rounds": args.rounds, "results": rows}
    width = max(len(k) for k in rows)
    for k, r in rows.items():
        print(f"{k.ljust(width)}  wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

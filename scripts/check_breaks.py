#!/usr/bin/env python
"""Apply each known regression ("break") to a scratch copy of the repository and check a test fails.

Issue #10 listed real regressions the suite once let through. Each entry of
:data:`BREAKS` is one of them written as an exact text substitution in one source file
plus the tests that must catch it. For each break the script copies the repository (the
files git tracks plus untracked, non-ignored ones) to a scratch directory once, applies
the substitution there (never in your working tree), runs the named tests with pytest,
restores the file, and records which tests failed. The clean copy is run first: a test
that fails without the break proves nothing.

A break whose text no longer occurs in its file (the code was refactored) is reported
as ``stale``: rewrite it against the new code. Results go to a JSON file
(``docs/testing_breaks.json`` by default) that ``docs/testing.md`` summarises.

Examples::

    python scripts/check_breaks.py                       # all breaks (minutes: slow tests included)
    python scripts/check_breaks.py --only cnn-nms-removed --only gallery-strict-threshold
    python scripts/check_breaks.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Break:
    """One regression: replace ``old`` (must occur exactly once) by ``new`` in ``file``."""

    id: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    #: occurrence to replace when ``old`` occurs more than once (0-based); None: must be unique
    occurrence: int | None = None


BREAKS: tuple[Break, ...] = (
    Break("embedder-weights-not-loaded",
          "the embedder checkpoint's weights silently not loaded (a random network runs)",
          "facepipe/embed/network.py",
          "        missing, unexpected = _load_state(net, sd)",
          "        missing, unexpected = [], []",
          ("tests/test_embedder_quality.py",)),
    Break("cnn-nms-removed",
          "the pyramid CNN detector (cnn-pyramid): non-maximum suppression removed",
          "facepipe/detect/cnn.py",
          "keep = batched_nms(b, sc, n, self.nms_iou)",
          "keep = torch.arange(len(sc))",
          ("tests/test_detector_contract.py",)),
    Break("fpn-nms-removed",
          "the default single-pass CNN detector (cnn): non-maximum suppression removed",
          "facepipe/detect/fpn.py",
          "keep = batched_nms(boxes, sc, n, self.nms_iou)",
          "keep = torch.arange(len(sc))",
          ("tests/test_detector_contract.py",)),
    Break("video-identity-first-frame",
          "a video track's identity taken from its first frame instead of the vote",
          "facepipe/video/process.py",
          "v = vote_identity(tr.votes, unknown_weight) if tr.votes else None",
          "v = vote_identity(tr.votes[:1], unknown_weight) if tr.votes else None",
          ("tests/test_track_identity.py", "tests/test_video_gallery.py")),
    Break("vote-first-frame",
          "vote_identity returns the first frame's name",
          "facepipe/track.py",
          "    best = max(weights, key=lambda n: (weights[n], counts[n], n == UNKNOWN))",
          "    best = votes[0][0]",
          ("tests/test_track_identity.py",)),
    Break("align-black-border",
          "align_face pads with black instead of replicating the border",
          "facepipe/align.py",
          "    m = similarity_matrix(landmarks, size)\n"
          "    return cv2.warpAffine(image, m, (int(size), int(size)), flags=cv2.INTER_LINEAR,\n"
          "                          borderMode=cv2.BORDER_REPLICATE)\n",
          "    m = similarity_matrix(landmarks, size)\n"
          "    return cv2.warpAffine(image, m, (int(size), int(size)), flags=cv2.INTER_LINEAR,\n"
          "                          borderMode=cv2.BORDER_CONSTANT)\n",
          ("tests/test_align_reference.py", "tests/test_align.py")),
    Break("align-template-112",
          "align_face always uses the 112-px template whatever the crop size",
          "facepipe/align.py",
          "    m = similarity_matrix(landmarks, size)\n",
          "    m = similarity_matrix(landmarks, 112)\n",
          ("tests/test_align_reference.py", "tests/test_align.py")),
    Break("gallery-strict-threshold",
          "the gallery's open-set decision uses > instead of >= at the threshold",
          "facepipe/gallery/core.py",
          "name = best.name if best.score >= t else UNKNOWN",
          "name = best.name if best.score > t else UNKNOWN",
          ("tests/test_open_set_threshold.py", "tests/test_gallery.py")),
    Break("no-motion-prediction",
          "tracker without motion prediction (a track is expected where it was last seen)",
          "facepipe/track.py",
          "        dt = max(0.0, t - self.last_time)\n        vx, vy, vw, vh = self.velocity",
          "        return self.box\n        dt = max(0.0, t - self.last_time)\n        vx, vy, vw, vh = self.velocity",
          ("tests/test_track.py",)),
    Break("embedder-training-no-step",
          "embedder training never applies its gradients",
          "facepipe/train/embedder.py",
          "        opt.step()\n",
          "        pass\n",
          ("tests/test_training.py::test_train_embedder_writes_a_loadable_checkpoint_and_learns",)),
    Break("detector-training-no-step",
          "single-pass detector training never applies its gradients",
          "facepipe/train/detector.py",
          "        opt.step()\n",
          "        pass\n",
          ("tests/test_training.py::test_train_detector_writes_a_loadable_checkpoint_and_learns",)),
    Break("classifier-training-no-step",
          "classifier training never applies its gradients",
          "facepipe/train/classifier.py",
          "        scaler.step(opt)\n",
          "        pass\n",
          ("tests/test_training.py::test_train_classifier_writes_a_loadable_checkpoint_and_learns",)),
)


@dataclass
class Outcome:
    id: str
    what: str
    file: str
    status: str                      # caught | missed | stale | baseline-failed
    failed: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).exists()]


def make_copy(root: Path, dst: Path) -> None:
    for rel in repo_files(root):
        s, d = root / rel, dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d, follow_symlinks=False)
    link = root / "facepipe" / "cascades"   # the worktree's symlink to the top-level cascades/
    if link.is_symlink() and not (dst / "facepipe" / "cascades").exists():
        os.symlink(os.readlink(link), dst / "facepipe" / "cascades")


def run_tests(copy: Path, tests: tuple[str, ...], env: dict[str, str], timeout: float) -> tuple[int, list[str], str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", p.stdout, flags=re.M)))
    tail = "\n".join(p.stdout.strip().splitlines()[-3:])
    return p.returncode, failed, tail


def apply(copy: Path, b: Break) -> str | None:
    """Apply the break in the copy; returns the original text, or None when stale."""
    f = copy / b.file
    if not f.is_file():
        return None
    text = f.read_text()
    n = text.count(b.old)
    if n == 0 or (b.occurrence is None and n != 1):
        return None
    k = b.occurrence or 0
    start = -1
    for _ in range(k + 1):
        start = text.index(b.old, start + 1)
    f.write_text(text[:start] + b.new + text[start + len(b.old):])
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="break id (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the breaks and exit")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "testing_breaks.json")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest run")
    args = ap.parse_args(argv)
    if args.list:
        for b in BREAKS:
            print(f"{b.id:32s} {b.file:32s} {b.what}")
        return 0
    chosen = [b for b in BREAKS if not args.only or b.id in args.only]
    unknown = set(args.only) - {b.id for b in BREAKS}
    if unknown:
        ap.error(f"unknown break id(s): {', '.join(sorted(unknown))}")

    sys.path.insert(0, str(ROOT))
    from facepipe.datasets import data_root

    env = dict(os.environ)
    data = data_root(required=False)
    if data is not None:
        env["FACEPIPE_DATA"] = str(data.resolve())
    env.setdefault("OMP_NUM_THREADS", "1")
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="facepipe-breaks-") as tmp:
        copy = Path(tmp) / "repo"
        make_copy(ROOT, copy)
        env["PYTHONPATH"] = str(copy)
        for b in chosen:
            t0 = time.time()
            rc, failed, tail = run_tests(copy, b.tests, env, args.timeout)
            if rc != 0:
                outcomes.append(Outcome(b.id, b.what, b.file, "baseline-failed", failed, list(b.tests),
                                        time.time() - t0, tail))
                print(f"{b.id}: the tests fail WITHOUT the break:\n{tail}", flush=True)
                continue
            original = apply(copy, b)
            if original is None:
                outcomes.append(Outcome(b.id, b.what, b.file, "stale", [], list(b.tests), 0.0,
                                        "the text to replace is not (uniquely) in the file"))
                print(f"{b.id}: stale (code moved)", flush=True)
                continue
            try:
                rc, failed, tail = run_tests(copy, b.tests, env, args.timeout)
            finally:
                (copy / b.file).write_text(original)
            status = "caught" if rc != 0 and failed else "missed"
            outcomes.append(Outcome(b.id, b.what, b.file, status, failed, list(b.tests), time.time() - t0, tail))
            print(f"{b.id}: {status} ({len(failed)} failing){''.join(chr(10) + '  ' + f for f in failed)}",
                  flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    doc = {"command": "python scripts/check_breaks.py" + "".join(f" --only {i}" for i in args.only),
           "commit": commit + ("+dirty" if dirty else ""), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
           "data": data is not None, "breaks": [asdict(o) for o in outcomes]}
    if args.only and args.out.is_file():   # merge into an existing full run
        old = json.loads(args.out.read_text())
        keep = [o for o in old.get("breaks", []) if o["id"] not in set(args.only)]
        doc["breaks"] = sorted(keep + doc["breaks"], key=lambda o: [b.id for b in BREAKS].index(o["id"])
                               if o["id"] in [b.id for b in BREAKS] else 999)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    bad = [o for o in outcomes if o.status != "caught"]
    print(f"{len(outcomes) - len(bad)}/{len(outcomes)} breaks caught -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

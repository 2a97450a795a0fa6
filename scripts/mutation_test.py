#!/usr/bin/env python
"""Mutation testing of facepipe's central modules with mutmut (slow: not part of CI).

mutmut (https://github.com/boxed/mutmut, the ``[mutation]`` extra) makes small changes
("mutants") to the code (``>=`` to ``>``, ``+ 1`` to ``+ 2``, a constant to ``None``, a
call argument dropped, ...) and runs the tests that cover the changed function; a mutant
the tests do not notice *survives*. Each target below names the module(s), the functions
to mutate and the fast test subset that should catch their mutants.

The script never touches your working tree: it copies the repository (tracked plus
untracked, non-ignored files) to a scratch directory per target, adds a ``[tool.mutmut]``
section to the copy's pyproject.toml, runs ``mutmut run`` there (one worker by default:
the machine is shared) and writes every mutant's status, and the diff of each survivor,
to a JSON file (``docs/mutation.json`` by default) that ``docs/testing.md`` summarises.

Examples::

    pip install -e ".[mutation]"
    nice -n 10 python scripts/mutation_test.py                          # every target (an hour or more)
    nice -n 10 python scripts/mutation_test.py --target align --target tracker
    python scripts/mutation_test.py --list
    # a run kept apart (--out runs/x.json), then recorded in docs/mutation.json:
    python scripts/mutation_test.py --import runs/x.json
    # after adding tests: only the survivors (and mutants a timed-out run did not reach) again
    nice -n 10 python scripts/mutation_test.py --target tracker --keep runs/copies --out runs/x.json
    nice -n 10 python scripts/mutation_test.py --target tracker --recheck runs/copies --out runs/x.json

Functions are mutmut's names: ``name`` for a module function, ``Class.method`` for a
method (mutmut spells it ``xǁClassǁmethod``). When code moves (a module split into a
package), update :data:`TARGETS`; a target whose file is gone is reported, not run.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    what: str
    files: tuple[str, ...]
    #: functions to mutate ("" = every function of the files)
    functions: tuple[str, ...]
    tests: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "gallery-decision": Target(
        "open-set decision, ranking and threshold calibration",
        ("facepipe/gallery/decision.py", "facepipe/gallery/core.py"),
        ("calibrate_threshold", "dir_fpir_curve", "Decision.known", "Gallery.identify", "Gallery.rank",
         "Gallery.calibration_scores", "Gallery.threshold", "Gallery.set_threshold", "Gallery.aggregation"),
        ("tests/test_gallery.py", "tests/test_open_set_threshold.py", "tests/test_gallery_decision.py")),
    "cohort": Target(
        "cohort penalties and the gallery's ranking by similarity minus penalty",
        ("facepipe/gallery/cohort.py", "facepipe/gallery/core.py"),
        ("Cohort.fingerprint", "Cohort.crowding", "Cohort.penalties", "Cohort.to_dict", "Cohort.from_dict",
         "build_cohort", "_encode", "_decode", "Gallery.rank", "Gallery.penalties", "Gallery.cohort"),
        ("tests/test_cohort.py",)),
    "align": Target(
        "five-landmark similarity alignment and the box-crop fallback",
        ("facepipe/align.py",), (),
        ("tests/test_align.py::test_reference_points_scale_with_crop",
         "tests/test_align.py::test_exact_similarity_is_recovered",
         "tests/test_align.py::test_noisy_landmarks_match_least_squares_reference",
         "tests/test_align.py::test_align_face_places_landmark_pixels_on_template",
         "tests/test_align.py::test_bad_landmarks_raise", "tests/test_align.py::test_box_crop_centres_the_box",
         "tests/test_align_reference.py")),
    "detector-post": Target(
        "single-pass CNN detector (--detector cnn) post-processing: box/landmark decoding, score "
        "threshold, input scaling, the coarse pass, NMS and containment suppression, min_size, ordering",
        ("facepipe/detect/fpn.py", "facepipe/boxes.py"),
        ("decode", "suppress_contained", "FPNDetector.input_scale", "FPNDetector._pass", "FPNDetector._run"),
        ("tests/test_fpn_postprocess.py", "tests/test_fpn_detector.py::test_encode_decode_roundtrip",
         "tests/test_fpn_detector.py::test_shipped_detector_finds_the_astronaut_once_with_landmarks_near_mtcnn",
         "tests/test_fpn_detector.py::test_shipped_detector_on_tiny_and_blank_images",
         "tests/test_fpn_detector.py::test_shipped_detector_batched_equals_single",
         "tests/test_detector_contract.py::test_no_two_boxes_overlap_beyond_the_nms_threshold[cnn]",
         "tests/test_detector_contract.py::test_the_one_face_is_reported_once_best_first[cnn]")),
    "detector-post-pyramid": Target(
        "the first CNN detector (--detector cnn-pyramid) post-processing: pyramid, score-map decoding, "
        "NMS, Haar+CNN verification",
        ("facepipe/detect/cnn.py",),
        ("pyramid_scales", "decode_map", "crops_around", "CNNDetector._run", "CNNDetector.detect_batch",
         "CNNDetector._detect_same_size", "CNNDetector.raw_boxes", "HaarCNNDetector.detect"),
        ("tests/test_cnn_detector.py::test_decode_map_places_windows_and_offsets",
         "tests/test_cnn_detector.py::test_pyramid_scales_cover_the_requested_face_sizes",
         "tests/test_cnn_detector.py::test_detector_handles_any_size_and_batches_like_single",
         "tests/test_cnn_detector.py::test_shipped_weights_find_the_astronaut_and_describe_themselves",
         "tests/test_cnn_detector.py::test_haar_cnn_verifies_the_astronaut",
         "tests/test_detector_contract.py")),
    "tracker": Target(
        "tracker (prediction, affinity, assignment, track lifetime) and the identity vote",
        ("facepipe/track.py", "facepipe/boxes.py"), (),
        ("tests/test_track.py", "tests/test_track_reid.py",
         "tests/test_track_identity.py::test_track_votes_follow_the_majority_not_the_first_frame",
         "tests/test_track_identity.py::test_vote_is_independent_of_frame_order",
         # re-identification (stitch_tracks, merge_tracks) and duplicate suppression: without
         # these the run reports their 244 mutants as "no tests"
         "tests/test_video_outputs.py::test_stitch_joins_a_lost_and_found_face",
         "tests/test_video_outputs.py::test_stitch_refuses",
         "tests/test_video_outputs.py::test_stitch_across_a_cut_only_when_asked",
         "tests/test_video_outputs.py::test_stitch_chains_and_prefers_the_most_similar",
         "tests/test_video_outputs.py::test_brute_force_stitch_matches_greedy_on_random_tracks",
         "tests/test_video_outputs.py::test_tracker_unchanged_for_a_steady_face",
         "tests/test_video_outputs.py::test_suppress_duplicates_drops_nested_boxes_of_one_face")),
    "checkpoint": Target(
        "checkpoint loading and validation: the embedder's (format, fields, preprocessing, weights) "
        "and the CNN detector's",
        ("facepipe/embed/network.py", "facepipe/detect/fpn.py"),
        ("load_checkpoint", "_require", "_load_state", "NetworkEmbedder.from_checkpoint",
         "NetworkEmbedder.from_checkpoint_dict", "load_detector", "_config_from_dict", "resolve_detector_weights"),
        ("tests/test_checkpoint_validation.py",
         "tests/test_embedder.py::test_checkpoint_round_trip_keeps_id_and_vectors",
         "tests/test_embedder.py::test_corrupt_and_mismatched_checkpoints_name_the_file",
         "tests/test_embedder.py::test_shipped_default_checkpoint_is_self_describing",
         "tests/test_embedder_quality.py::test_default_embedder_runs_the_checkpoint_weights",
         "tests/test_fpn_detector.py::test_checkpoint_roundtrip_keeps_threshold_and_calibration",
         "tests/test_fpn_detector.py::test_bad_checkpoints_raise_checkpoint_error_naming_the_file",
         "tests/test_fpn_detector.py::test_shipped_detector_is_package_data_and_says_how_its_threshold_was_chosen")),
    "checkpoint-classifier": Target(
        "checkpoint writing and loading of the embedder and the CNN face/non-face classifier (the whole "
        "save/make/load set: ~2,000 mutants, hours)",
        ("facepipe/embed/network.py", "facepipe/detect/cnn.py"),
        ("load_checkpoint", "_require", "_load_state", "state_dict_hash", "NetworkEmbedder.from_checkpoint",
         "resolve_weights", "save_checkpoint", "make_checkpoint"),
        ("tests/test_embedder.py::test_checkpoint_round_trip_keeps_id_and_vectors",
         "tests/test_embedder.py::test_corrupt_and_mismatched_checkpoints_name_the_file",
         "tests/test_embedder.py::test_shipped_default_checkpoint_is_self_describing",
         "tests/test_embedder_quality.py::test_default_embedder_runs_the_checkpoint_weights",
         "tests/test_cnn_detector.py::test_shipped_weights_are_installed",
         "tests/test_cnn_detector.py::test_checkpoint_roundtrip_is_self_describing",
         "tests/test_cnn_detector.py::test_bad_checkpoints_raise_checkpoint_error_naming_the_file")),
}

STATUS_RE = re.compile(r"^\s+(\S+): (.+)$")


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).exists()]


def make_copy(root: Path, dst: Path) -> None:
    for rel in repo_files(root):
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, d, follow_symlinks=False)
    # mutmut copies facepipe/ into mutants/: the Haar cascades must be real files inside it
    if not (dst / "facepipe" / "cascades").exists() and (dst / "cascades").is_dir():
        shutil.copytree(dst / "cascades", dst / "facepipe" / "cascades")


def mutant_globs(t: Target) -> list[str]:
    """mutmut mutant-name patterns for the target's functions (all of the files' when empty)."""
    mods = [f[:-3].replace("/", ".") for f in t.files]
    if not t.functions:
        return [f"{m}.*" for m in mods]
    out = []
    for m in mods:
        for fn in t.functions:
            if "." in fn:
                cls, meth = fn.split(".", 1)
                out.append(f"{m}.xǁ{cls}ǁ{meth}__mutmut_*")
            else:
                out.append(f"{m}.x_{fn}__mutmut_*")
    return out


def toml_list(items: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the mutated copy, not a worktree
    env.setdefault("OMP_NUM_THREADS", "1")
    from facepipe.datasets import data_root

    data = data_root(required=False)
    if data is not None:
        env["FACEPIPE_DATA"] = str(data.resolve())
    return env


def _statuses(copy: Path, env: dict[str, str], globs: list[str]) -> dict[str, str]:
    """mutmut's status of every mutant matching ``globs`` in a copy."""
    from fnmatch import fnmatch

    res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=copy, env=env,
                         capture_output=True, text=True)
    out: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = STATUS_RE.match(line)
        if m and any(fnmatch(m.group(1), g) for g in globs):
            out[m.group(1)] = m.group(2).strip()
    return out


def run_target(name: str, t: Target, workdir: Path, children: int, timeout: float,
               extra_pytest: list[str], timeout_multiplier: float = 15.0,
               recheck: Path | None = None) -> dict:
    """Run mutmut on one target in a fresh copy of the repository, or, with ``recheck`` (a copy
    kept by an earlier run), only on the mutants that survived there or were not reached,
    against the current tests (copied in): killed mutants stay killed."""
    missing = [f for f in t.files + t.tests if not (ROOT / f.split("::")[0]).exists()]
    if missing:
        return {"target": name, "what": t.what, "status": "stale", "missing": missing}
    env = _env()
    mutmut = [sys.executable, "-m", "mutmut"]
    globs = mutant_globs(t)
    names: list[str] = globs
    if recheck is not None:
        copy = recheck / name
        if not (copy / "mutants").is_dir():
            raise SystemExit(f"{copy}: not a kept mutmut copy of target {name} (run with --keep first)")
        for tests in (copy / "tests", copy / "mutants" / "tests"):   # mutmut runs the tests from mutants/
            shutil.rmtree(tests, ignore_errors=True)
            shutil.copytree(ROOT / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
        names = sorted(m for m, st in _statuses(copy, env, globs).items()
                       if st in ("survived", "no tests", "not checked"))
        if not names:
            return {"target": name, "what": t.what, "status": "nothing to recheck"}
    else:
        copy = workdir / name
        if copy.exists():      # a kept copy of an earlier run: mutmut would reuse its cached results
            shutil.rmtree(copy)
        make_copy(ROOT, copy)
        with open(copy / "pyproject.toml", "a") as f:
            f.write("\n[tool.mutmut]\n"
                    f'source_paths = ["facepipe"]\n'
                    f"only_mutate = {toml_list(t.files)}\n"
                    f"pytest_add_cli_args_test_selection = {toml_list(t.tests)}\n"
                    f"pytest_add_cli_args = {toml_list(['-p', 'no:cacheprovider', '-q', *extra_pytest])}\n"
                    'process_isolation = "forkserver"\n'
                    'also_copy = ["scripts", "cascades"]\n'
                    "use_git_change_detection = false\n"
                    f"timeout_multiplier = {float(timeout_multiplier)}\n")
    t0 = time.time()
    log = (copy / ("mutmut-recheck.log" if recheck else "mutmut-run.log")).open("w")
    try:
        p = subprocess.run(mutmut + ["run", "--max-children", str(children), *names], cwd=copy, env=env,
                           stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        status = "ran" if p.returncode == 0 else f"mutmut exit {p.returncode}"
    except subprocess.TimeoutExpired:
        # keep what mutmut recorded so far; mutants it did not reach are "not checked"
        status = f"timed out after {timeout:.0f} s (partial)"
    seconds = time.time() - t0
    statuses = _statuses(copy, env, globs)
    survivors = {}
    for mutant, st in statuses.items():
        if st in ("survived", "no tests"):
            diff = subprocess.run(mutmut + ["show", mutant], cwd=copy, env=env, capture_output=True, text=True)
            survivors[mutant] = "\n".join(diff.stdout.splitlines()[1:]).strip()
    counts: dict[str, int] = {}
    for st in statuses.values():
        counts[st] = counts.get(st, 0) + 1
    out = {"target": name, "what": t.what, "files": list(t.files), "functions": list(t.functions),
           "tests": list(t.tests), "status": status,
           "seconds": round(seconds), "counts": counts, "mutants": len(statuses),
           "survivors": survivors}
    if recheck is not None:
        out["rechecked"] = {"copy": str(recheck), "mutants": len(names), "seconds": round(seconds)}
    return out


def target_command(name: str, args: argparse.Namespace) -> str:
    """The command line that reruns one target as this run did."""
    cmd = f"python scripts/mutation_test.py --target {name}"
    if args.children != 1:
        cmd += f" --children {args.children}"
    if args.timeout_multiplier != 15:
        cmd += f" --timeout-multiplier {args.timeout_multiplier:g}"
    if args.recheck:
        cmd += f" --recheck {args.recheck}"
    return cmd


def import_results(src: Path, out: Path, only: list[str]) -> int:
    """Merge the target records of results file ``src`` into ``out`` (same format)."""
    new = json.loads(src.read_text())
    records = [r for r in new.get("targets", []) if not only or r["target"] in only]
    if not records:
        print(f"{src}: no target records to import", file=sys.stderr)
        return 1
    for r in records:   # files written before targets recorded their own command
        r.setdefault("command", new.get("command", ""))
    doc = json.loads(out.read_text()) if out.is_file() else {k: v for k, v in new.items() if k != "targets"}
    names = {r["target"] for r in records}
    doc["targets"] = [r for r in doc.get("targets", []) if r["target"] not in names] + records
    for key in ("commit", "date", "machine", "mutmut"):
        doc[key] = new.get(key, doc.get(key))
    doc["command"] = records[-1]["command"]
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"{', '.join(sorted(names))} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", default=[], help=f"one of {', '.join(TARGETS)} (repeatable)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "mutation.json")
    ap.add_argument("--children", type=int, default=1, help="parallel mutmut workers [1: shared machine]")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per target")
    ap.add_argument("--timeout-multiplier", type=float, default=15.0,
                    help="a mutant times out after this many times its tests' clean run time [15; "
                         "raise it on a busy machine, where load spikes look like timeouts]")
    ap.add_argument("--keep", type=Path, default=None, help="keep the scratch copies here (for mutmut browse)")
    ap.add_argument("--pytest-arg", action="append", default=[], help="extra pytest argument (e.g. -m 'not slow')")
    ap.add_argument("--recheck", type=Path, default=None, metavar="DIR",
                    help="continue the copies an earlier run kept (--keep DIR): copy the current tests in and "
                         "run only the mutants that survived there or were not reached (killed stay killed)")
    ap.add_argument("--import", dest="import_from", type=Path, default=None, metavar="JSON",
                    help="run nothing: copy the targets of another results file (a run written with --out "
                         "elsewhere) into --out, replacing those targets there")
    args = ap.parse_args(argv)
    if args.import_from is not None:
        return import_results(args.import_from, args.out, args.target)
    if args.list:
        for k, t in TARGETS.items():
            print(f"{k:18s} {', '.join(t.files):45s} {t.what}")
        return 0
    unknown = set(args.target) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        ap.error('mutmut is not installed: pip install -e ".[mutation]"')
    sys.path.insert(0, str(ROOT))
    chosen = args.target or list(TARGETS)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="facepipe-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    import mutmut as _m

    def save() -> None:
        """Write what has been measured so far (after every target: runs take hours)."""
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        doc = {"command": "python scripts/mutation_test.py" + "".join(f" --target {t}" for t in args.target)
                          + (f" --timeout-multiplier {args.timeout_multiplier:g}" if args.timeout_multiplier != 15 else ""),
               "commit": commit + ("+dirty" if dirty else ""), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), Python {platform.python_version()}",
               "mutmut": getattr(_m, "__version__", "?"), "targets": list(results)}
        if args.out.is_file():   # keep earlier runs of the other targets
            old = json.loads(args.out.read_text())
            done = {r["target"] for r in results}
            doc["targets"] = [r for r in old.get("targets", []) if r["target"] not in done] + list(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    try:
        for name in chosen:
            print(f"{name}: running mutmut ...", flush=True)
            r = run_target(name, TARGETS[name], workdir, args.children, args.timeout, args.pytest_arg,
                           args.timeout_multiplier, args.recheck)
            if "rechecked" in r and args.out.is_file():   # the run whose copy was continued
                earlier = [e for e in json.loads(args.out.read_text()).get("targets", []) if e["target"] == name]
                if earlier and "counts" in earlier[0]:
                    r["rechecked"].update(earlier_counts=earlier[0]["counts"], earlier_seconds=earlier[0]["seconds"],
                                          earlier_status=earlier[0]["status"])
                    r["seconds_total"] = earlier[0]["seconds"] + r["seconds"]
            r["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip()
            r["date"] = time.strftime("%Y-%m-%d")
            r["command"] = target_command(name, args)
            r["children"] = args.children
            r["timeout_multiplier"] = args.timeout_multiplier
            # the last commit that changed the mutated files (the code under test)
            r["source_commit"] = subprocess.run(["git", "log", "-1", "--format=%H", "--", *TARGETS[name].files],
                                                cwd=ROOT, capture_output=True, text=True).stdout.strip()
            results.append(r)
            save()
            print(f"{name}: {r.get('counts', r.get('status'))}, {len(r.get('survivors', {}))} survivors, "
                  f"{r.get('seconds', 0)} s", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

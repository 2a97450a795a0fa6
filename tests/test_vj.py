"""Viola–Jones cascade training (facepipe.vj): features, OpenCV agreement, XML, resume, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import cli
from facepipe.errors import CheckpointError, InputError, OutputError
from facepipe.vj.boost import StageSettings, accept_threshold, stage_threshold, train_stage
from facepipe.vj.features import brute_force_value, feature_values, generate_features, integral_images, window_norm
from facepipe.vj.model import Cascade
from facepipe.vj import synthetic
from facepipe.vj.samples import NegativeSource
from facepipe.vj.train import TrainParams, load_state, state_path, train_cascade
from facepipe.vj.xmlio import cascade_to_xml, read_cascade, write_cascade

STOCK = Path(__file__).resolve().parent.parent / "cascades" / "haarcascade_frontalface_default.xml"
S = synthetic.WINDOW  # 16


# ----------------------------------------------------------------------------- synthetic problem
_noise = synthetic.noise


# stops at its false-alarm target (0.5**8) after about 6 stages, in seconds
PARAMS = TrainParams(width=S, height=S, stages=8, num_pos=300, num_neg=300, features_per_stage=1000,
                     bins=32, seed=3)


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, NegativeSource]:
    """Bright squares on noise; negatives are noise with bright bars (facepipe.vj.synthetic)."""
    return synthetic.problem()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, problem) -> tuple[Path, object]:  # noqa: ANN001
    out = tmp_path_factory.mktemp("vj") / "square.xml"
    pos, neg = problem
    return out, train_cascade(pos, neg, PARAMS, out)


def _square_scene(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    return synthetic.scene(rng)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


# ----------------------------------------------------------------------------- features
def test_basic_feature_count_is_viola_jones() -> None:
    # Viola & Jones: "the exhaustive set of rectangle features is quite large, 160,000" (162,336 at 24x24)
    assert len(generate_features(24, 24, "basic")) == 162336
    core = generate_features(12, 10, "core")
    assert np.all(core.rects[..., 0] + core.rects[..., 2] <= 12)
    assert np.all(core.rects[..., 1] + core.rects[..., 3] <= 10)


@pytest.mark.parametrize("mode", ["basic", "core"])
def test_feature_values_equal_brute_force_sums(mode: str) -> None:
    rng = np.random.default_rng(1)
    feats = generate_features(12, 10, mode)
    wins = rng.integers(0, 256, (6, 10, 12), dtype=np.uint8)
    wins[0] = 77  # flat window: nf = 0, OpenCV's vnf = 1
    ids = rng.choice(len(feats), 300, replace=False)
    vals = feature_values(feats, wins, ids)
    for j, f in enumerate(ids):
        for i in range(len(wins)):
            assert vals[i, j] == np.float32(brute_force_value(feats, int(f), wins[i]))


def test_window_norm_follows_opencv_rule() -> None:
    rng = np.random.default_rng(2)
    low = np.clip(rng.normal(100, 4, (3, 24, 24)), 0, 255).astype(np.uint8)  # sigma ~ 4 -> skipped
    high = rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)
    ii, sq = integral_images(np.concatenate([low, high]))
    vnf, valid = window_norm(ii, sq)
    assert valid.tolist() == [False] * 3 + [True] * 3
    inner = high[0, 1:23, 1:23].astype(np.float64)
    assert vnf[3] == np.float32(1.0 / (inner.size * inner.std()))


# ----------------------------------------------------------------------------- OpenCV agreement
def _opencv_single_windows(xml: Path, wins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's accept decision and final-stage sum for each window, evaluated alone."""
    import cv2

    cc = cv2.CascadeClassifier(str(xml))
    assert not cc.empty()
    n, h, w = wins.shape
    acc = np.zeros(n, bool)
    sums = np.full(n, np.nan)
    for i, win in enumerate(wins):
        img = np.pad(win, ((0, 1), (0, 1)), mode="edge")  # one spare row/column: exactly one position
        r, _, wt = cc.detectMultiScale3(img, scaleFactor=1.1, minNeighbors=0, minSize=(w, h), maxSize=(w, h),
                                        outputRejectLevels=True)
        if len(r):
            acc[i] = True
            sums[i] = float(np.ravel(wt)[0])
    return acc, sums


def _astronaut_windows(astronaut: np.ndarray, size: int, n: int) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        side = int(rng.integers(size, 200))
        y, x = rng.integers(0, 512 - side, 2)
        out.append(cv2.resize(grey[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_LINEAR))
    # the face itself at a few framings
    for s in (90, 100, 110, 120):
        out.append(cv2.resize(grey[62 + 55 - s // 2:62 + 55 + s // 2, 224 - s // 2:224 + s // 2], (size, size),
                              interpolation=cv2.INTER_LINEAR))
    return np.stack(out)


def test_python_evaluation_matches_opencv_on_stock_cascade(astronaut: np.ndarray) -> None:
    cascade = read_cascade(STOCK)
    assert (len(cascade.stages), cascade.n_weak) == (25, 2913)
    wins = _astronaut_windows(astronaut, 24, 300)
    passed, sums = cascade.evaluate_windows(wins)
    acc_cv, sums_cv = _opencv_single_windows(STOCK, wins)
    ours = passed == len(cascade.stages)
    assert ours.any() and (~ours).any()
    np.testing.assert_array_equal(ours, acc_cv)
    np.testing.assert_array_equal(sums[ours], sums_cv[ours])  # bit-identical stage sums


def test_scan_matches_evaluate_windows(astronaut: np.ndarray) -> None:
    import cv2

    cascade = read_cascade(STOCK).truncated(6)
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)[:200, 150:350]
    pos, passed, sums = cascade.scan(grey, step=3)
    from numpy.lib.stride_tricks import sliding_window_view

    wins = sliding_window_view(grey, (24, 24))[pos[:, 0], pos[:, 1]]
    p2, s2 = cascade.evaluate_windows(np.ascontiguousarray(wins))
    np.testing.assert_array_equal(passed, p2)
    np.testing.assert_array_equal(sums, s2)
    # the dense whole-grid path (first stage on shifted views) gives the same answers
    from facepipe.vj.model import image_integrals

    p3, s3 = cascade.run_grid(*image_integrals(grey), step=3)
    np.testing.assert_array_equal(passed, p3)
    np.testing.assert_array_equal(sums, s3)


# ----------------------------------------------------------------------------- boosting
def test_stage_threshold_keeps_the_hit_rate_after_float32_rounding() -> None:
    rng = np.random.default_rng(4)
    sums = rng.normal(3.0, 2.0, 1001) * 7.123456789
    thr = stage_threshold(sums, 0.995)
    assert (sums >= accept_threshold(thr)).mean() >= 0.995
    assert np.float32(thr) == thr


@pytest.mark.parametrize("boost", ["gentle", "real", "discrete"])
def test_one_stage_meets_its_targets(problem, boost: str) -> None:  # noqa: ANN001
    pos, neg = problem
    rng = np.random.default_rng(0)
    negw = neg.random_windows(400, rng)
    samples = np.concatenate([pos[:400], negw])
    y = np.r_[np.ones(400), -np.ones(len(negw))]
    ii, sq = integral_images(samples)
    vnf, _ = window_norm(ii, sq)
    feats = generate_features(S, S)
    stage, rep = train_stage(ii.reshape(len(samples), -1).astype(np.float64), vnf, y, feats,
                             rng.choice(len(feats), 1500, replace=False),
                             StageSettings(0.995, 0.5, 30, boost, 32), rng)
    assert rep.hit_rate >= 0.995 and rep.false_alarm <= 0.5
    # the stage's own bookkeeping equals an independent evaluation of the stage
    cascade = Cascade(S, S, feats, [stage])
    acc = cascade.accepts(samples)
    assert acc[:400].mean() == pytest.approx(rep.hit_rate)
    assert acc[400:].mean() == pytest.approx(rep.false_alarm)


# ----------------------------------------------------------------------------- training end to end
def test_trained_cascade_loads_in_opencv_and_finds_the_square(trained) -> None:  # noqa: ANN001
    import cv2

    out, result = trained
    assert len(result.cascade.stages) >= 4
    assert all(s["hit_rate"] >= 0.995 and s["false_alarm"] <= 0.5 for s in result.stages)
    cc = cv2.CascadeClassifier(str(out))
    assert not cc.empty()
    img, expected = _square_scene(np.random.default_rng(7))
    rects = cc.detectMultiScale(img, scaleFactor=1.1, minNeighbors=3)
    assert len(rects) >= 1
    assert max(_iou(tuple(map(float, r)), expected) for r in rects) > 0.5
    # and nothing in a scene without squares
    empty = _noise(np.random.default_rng(8), 200, 240)
    assert len(cc.detectMultiScale(empty, scaleFactor=1.1, minNeighbors=3)) == 0


def test_trained_cascade_agrees_with_opencv_window_by_window(trained, problem) -> None:  # noqa: ANN001
    out, result = trained
    pos, neg = problem
    wins = np.concatenate([pos[:150], neg.random_windows(150, np.random.default_rng(5))])
    ours = read_cascade(out).accepts(wins)
    theirs, _ = _opencv_single_windows(out, wins)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, result.cascade.accepts(wins))


def test_negatives_are_bootstrapped(trained, problem) -> None:  # noqa: ANN001
    _, result = trained
    pos, neg = problem
    # every stage after the first was trained on windows the earlier stages accepted: their
    # acceptance estimate falls stage by stage, and mined windows do pass the cascade so far
    acc = [s["neg_acceptance_before"] for s in result.stages]
    assert acc[0] == 1.0 and all(b < a for a, b in zip(acc, acc[1:]))
    first = result.cascade.truncated(1)
    wins, rep = neg.mine(first, 100, np.random.default_rng(9))
    assert len(wins) == 100 and first.accepts(wins).all()
    assert 0 < rep.acceptance < 1


def test_negatives_keep_away_from_excluded_boxes() -> None:
    from facepipe.evaluate import box_iou_matrix
    from facepipe.vj.samples import NegativeImage

    rng = np.random.default_rng(6)
    box = np.array([[40.0, 30.0, 50.0, 50.0]])
    src = NegativeSource([NegativeImage(synthetic.noise(rng, 120, 160), box)], S, S, scale_step=1.5, max_iou=0.3)
    n_checked = 0
    for k, (_, scale) in enumerate(src.pages):
        _, pos, s = src.page(k)
        wins = np.stack([pos[:, 1] * s, pos[:, 0] * s, np.full(len(pos), S * s), np.full(len(pos), S * s)], 1)
        assert box_iou_matrix(wins, box).max() < 0.3
        n_checked += len(pos)
    full = NegativeSource([NegativeImage(synthetic.noise(rng, 120, 160))], S, S, scale_step=1.5)
    assert 0 < n_checked < full.n_windows()


def test_face_windows_frame_the_box() -> None:
    from facepipe.vj.facedata import cut_windows

    img = np.zeros((100, 120), np.uint8)
    img[20:60, 30:70] = 200  # the "face" fills the box exactly
    win = cut_windows(img, np.array([[30.0, 20.0, 40.0, 40.0]]), 24)[0]
    assert win[2:-2, 2:-2].min() == 200 and win.shape == (24, 24)
    wider = cut_windows(img, np.array([[10.0, 0.0, 80.0, 80.0]]), 24)[0]
    assert wider[:4].max() == 0 and wider[10:14, 10:14].min() == 200


def test_xml_round_trip(trained, tmp_path: Path) -> None:  # noqa: ANN001
    out, result = trained
    back = read_cascade(out)
    ref = result.cascade.compact()
    assert (back.width, back.height) == (S, S)
    assert len(back.stages) == len(ref.stages)
    for a, b in zip(back.stages, ref.stages):
        assert a.threshold == np.float32(b.threshold)
        assert [(s.feature, s.threshold, s.left, s.right) for s in a.stumps] == \
            [(s.feature, s.threshold, s.left, s.right) for s in b.stumps]
    np.testing.assert_array_equal(back.features.rects, ref.features.rects)
    np.testing.assert_array_equal(back.features.weights, ref.features.weights)
    again = write_cascade(back, tmp_path / "again.xml")
    assert cascade_to_xml(read_cascade(again)) == cascade_to_xml(back)


def test_stock_cascade_round_trips_through_our_writer(tmp_path: Path, astronaut: np.ndarray) -> None:
    stock = read_cascade(STOCK)
    copy = write_cascade(stock, tmp_path / "stock_copy.xml")
    wins = _astronaut_windows(astronaut, 24, 60)
    a, _ = _opencv_single_windows(STOCK, wins)
    b, _ = _opencv_single_windows(copy, wins)
    np.testing.assert_array_equal(a, b)


def test_reader_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<opencv_storage><x/></opencv_storage>")
    with pytest.raises(CheckpointError, match="not an OpenCV cascade"):
        read_cascade(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_cascade(tmp_path / "missing.xml")
    tree = Path(STOCK).parent / "haarcascade_frontalface_alt2.xml"
    with pytest.raises(CheckpointError, match="tree"):
        read_cascade(tree)


def test_resume_continues_from_the_last_finished_stage(trained, problem, tmp_path: Path) -> None:  # noqa: ANN001
    _, full = trained
    pos, neg = problem
    out = tmp_path / "resumed.xml"

    class Killed(Exception):
        pass

    def kill_after_two(stage: dict) -> None:
        if stage["stage"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train_cascade(pos, neg, PARAMS, out, on_stage=kill_after_two)
    assert len(read_cascade(out).stages) == 2  # a usable cascade of the finished stages
    state = load_state(out)
    assert state is not None and len(state["stages"]) == 2
    resumed = train_cascade(pos, neg, PARAMS, out, resume=True)
    assert len(resumed.cascade.stages) == len(full.cascade.stages)
    for a, b in zip(resumed.cascade.stages, full.cascade.stages):
        assert a == b  # identical to the uninterrupted run
    assert len(json.loads(state_path(out).read_text())["stage_stats"]) == len(full.stages)


def test_resume_refuses_other_settings_and_overwrites_only_when_asked(trained, problem, tmp_path: Path) -> None:  # noqa: ANN001
    pos, neg = problem
    out = tmp_path / "c.xml"
    train_cascade(pos, neg, replace(PARAMS, stages=1), out)
    with pytest.raises(InputError, match="parameters differ"):
        train_cascade(pos, neg, replace(PARAMS, stages=2, min_hit_rate=0.99), out, resume=True)
    with pytest.raises(InputError, match="positives or negatives differ"):
        train_cascade(pos[:-1], neg, replace(PARAMS, stages=2), out, resume=True)
    with pytest.raises(OutputError, match="--resume"):
        train_cascade(pos, neg, replace(PARAMS, stages=1), out)
    train_cascade(pos, neg, replace(PARAMS, stages=1, seed=4), out, overwrite=True)
    assert load_state(out)["params"]["seed"] == 4


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The square problem as files, as `python -m facepipe.vj.synthetic DIR` writes them."""
    return synthetic.write_example(tmp_path_factory.mktemp("synthetic"))


def test_cli_trains_and_detect_uses_the_cascade(synthetic_files: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "sq.xml"
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "cascade", "--positives", synthetic_files["positives"], "--negatives",
                              synthetic_files["negatives"], "--out", str(out), "--size", str(S), "--stages", "8",
                              "--num-pos", "300", "--num-neg", "300", "--features-per-stage", "1000",
                              "--bins", "32", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["stages"] >= 4 and out.is_file() and state_path(out).is_file()
    res = runner.invoke(cli, ["detect", "--detector", "haar", "--cascade", str(out), "--min-detect-size", str(S),
                              "--format", "json", synthetic_files["scene"]])
    assert res.exit_code == 0, res.output
    faces = json.loads(res.stdout)[0]["faces"]
    assert faces and all(f["detector"] == "haar" for f in faces)
    expected = tuple(float(v) for v in synthetic_files["expected_box"].split(","))
    assert max(_iou((f["x"], f["y"], f["w"], f["h"]), expected) for f in faces) > 0.5


def test_cli_one_line_errors(synthetic_files: dict[str, str], tmp_path: Path) -> None:
    pos, neg = synthetic_files["positives"], synthetic_files["negatives"]
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "cascade", "--positives", str(tmp_path / "nope.npz"), "--negatives",
                               str(neg), "--out", str(tmp_path / "x.xml"), "-q"])
    assert res.exit_code != 0 and "nope.npz" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros(3))
    res = runner.invoke(cli, ["train", "cascade", "--positives", str(bad), "--negatives", str(neg),
                               "--out", str(tmp_path / "x.xml"), "-q"])
    assert res.exit_code != 0 and "images" in res.output
    res = runner.invoke(cli, ["train", "cascade", "--positives", str(pos), "--negatives", str(neg),
                               "--out", str(tmp_path / "x.txt"), "-q"])
    assert res.exit_code != 0 and ".xml" in res.output


def _tiny_dev_root(root: Path) -> Path:
    """A development-data root with the layout --dev-faces reads: Caltech-like crops and two scenes, no LFW."""
    import cv2

    from facepipe.train.classifier_data import _stable_hash

    rng = np.random.default_rng(11)
    cdir = root / "face_nonface" / "caltech_faces_36x36"
    cdir.mkdir(parents=True)
    for name, n in (("faces_train.npz", 60), ("faces_val.npz", 20)):
        crops = rng.integers(0, 90, (n, 36, 36)).astype(np.uint8)
        crops[:, 8:28, 8:28] += 150  # a bright square where the "face" is
        np.savez(cdir / name, images=crops)
    sdir = root / "face_nonface" / "nonface_scenes" / "images"
    sdir.mkdir(parents=True)
    # one scene name in each split of the by-name rule (hash below 20 % -> validation)
    names = [f"scene{i}.png" for i in range(40)]
    val = next(n for n in names if _stable_hash(n) % 1000 < 200)
    train = next(n for n in names if _stable_hash(n) % 1000 >= 200)
    for n in (val, train):
        cv2.imwrite(str(sdir / n), synthetic.noise(rng, 120, 160))
    return root


def test_packaged_scenes_join_dev_faces_negatives_split_by_name(tmp_path: Path) -> None:
    """--packaged-scenes adds the installed face-free images, held out by name, and the record says so."""
    from facepipe.train.classifier_data import _stable_hash
    from facepipe.train.detector_data import packaged_scene_files

    files = packaged_scene_files()
    if not files:
        pytest.skip("no packaged face-free images installed")
    expect = {"train": [], "val": []}
    for f in files:
        expect["val" if _stable_hash(f.name) % 1000 < 200 else "train"].append(f"{f.parent.name}/{f.name}")
    root = _tiny_dev_root(tmp_path / "data")
    runner = CliRunner()
    infos = {}
    for flag in ([], ["--packaged-scenes"]):
        out = tmp_path / ("with" if flag else "without") / "c.xml"
        res = runner.invoke(cli, ["train", "cascade", "--dev-faces", *flag, "--data", str(root), "--out", str(out),
                                  "--size", "16", "--stages", "1", "--num-pos", "100", "--num-neg", "100",
                                  "--max-weak", "5", "--features-per-stage", "200", "--bins", "16", "-q"])
        assert res.exit_code == 0, res.output
        infos[bool(flag)] = load_state(out)["info"]
    without, with_ = infos[False], infos[True]
    assert "packaged_scenes" not in without
    assert without["negative_images"] == {"train": 1, "val": 1}
    assert with_["packaged_scenes"] == expect
    assert with_["negative_images"] == {"train": 1 + len(expect["train"]), "val": 1 + len(expect["val"])}
    assert with_["train"]["scenes"] == 1 + len(expect["train"]) and with_["val"]["scenes"] == 1 + len(expect["val"])
    if any(f.name == "logo.png" for f in files):  # pins the split: the detector holds out the same images
        assert "data/logo.png" in with_["packaged_scenes"]["val"]
        assert "data/coins.png" in with_["packaged_scenes"]["train"]


def test_packaged_scenes_need_dev_faces(synthetic_files: dict[str, str], tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["train", "cascade", "--positives", synthetic_files["positives"], "--negatives",
                                   synthetic_files["negatives"], "--packaged-scenes", "--out",
                                   str(tmp_path / "x.xml"), "-q"])
    assert res.exit_code == 2 and "--packaged-scenes" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- the shipped face cascade
SHIPPED = STOCK.parent / "facepipe_frontalface.xml"
#: earlier shipped versions, kept with their training records so their benchmarks stay reproducible
ARCHIVED = sorted((STOCK.parent.parent / "docs" / "results" / "cascades").glob("*/facepipe_frontalface.xml"))


def test_shipped_face_cascade_finds_the_astronaut(astronaut: np.ndarray) -> None:
    from facepipe.detect.haar import HaarDetector
    from facepipe.types import Box

    face = Box(181.0, 62.0, 87.0, 110.0)  # tight face box (MTCNN), see tests/test_haar.py
    dets = HaarDetector(cascade=SHIPPED.name).detect(astronaut)
    assert dets
    best = dets[0].box
    # head-box convention: a square around the whole head, centred on the face
    assert best.x < face.x + face.w / 2 < best.x + best.w and best.y < face.y + face.h / 2 < best.y + best.h
    assert best.w >= face.w and best.iou(face) > 0.3


def test_shipped_face_cascade_python_evaluation_matches_opencv(astronaut: np.ndarray) -> None:
    cascade = read_cascade(SHIPPED)
    assert cascade.params.get("boost") == "gentle" and len(cascade.stages) >= 10
    wins = _astronaut_windows(astronaut, cascade.width, 200)
    passed, sums = cascade.evaluate_windows(wins)
    acc_cv, sums_cv = _opencv_single_windows(SHIPPED, wins)
    ours = passed == len(cascade.stages)
    np.testing.assert_array_equal(ours, acc_cv)
    np.testing.assert_array_equal(sums[ours], sums_cv[ours])


@pytest.mark.parametrize("xml", [SHIPPED, *ARCHIVED], ids=lambda p: str(p.relative_to(STOCK.parent.parent)))
def test_face_cascade_matches_its_training_record(xml: Path, astronaut: np.ndarray) -> None:
    """The ``.train.json`` next to a facepipe cascade is the record of exactly that XML: the
    same stages, thresholds and stumps (the record's global feature ids resolve to the XML's
    rectangles), the same settings, one figure line per stage; rebuilt from the record, the
    cascade takes the same decisions as OpenCV running the XML."""
    from facepipe.vj.features import generate_features
    from facepipe.vj.model import Stage, Stump

    record = json.loads(xml.with_name(xml.stem + ".train.json").read_text())
    cascade = read_cascade(xml)
    p = record["params"]
    assert (cascade.width, cascade.height) == (p["width"], p["height"])
    assert cascade.params["boost"] == p["boost"] and cascade.params["mode"] == p["mode"]
    assert cascade.params["min_hit_rate"] == pytest.approx(p["min_hit_rate"])
    assert len(record["stages"]) == len(cascade.stages) == len(record["stage_stats"])
    assert [len(s["stumps"]) for s in record["stages"]] == [len(s.stumps) for s in cascade.stages] == \
        [st["n_weak"] for st in record["stage_stats"]]
    feats = generate_features(p["width"], p["height"], p["mode"])
    f32 = np.float32
    for rec_stage, stage in zip(record["stages"], cascade.stages):
        assert f32(rec_stage["threshold"]) == f32(stage.threshold)
        for (f, t, left, right), stump in zip(rec_stage["stumps"], stage.stumps):
            assert (f32(t), f32(left), f32(right)) == (f32(stump.threshold), f32(stump.left), f32(stump.right))
            np.testing.assert_array_equal(feats.rects[f], cascade.features.rects[stump.feature])
            np.testing.assert_array_equal(feats.weights[f], cascade.features.weights[stump.feature])
    rebuilt = Cascade(p["width"], p["height"], feats,
                      [Stage([Stump(int(f), float(f32(t)), float(f32(lv)), float(f32(rv))) for f, t, lv, rv in s["stumps"]],
                             float(f32(s["threshold"]))) for s in record["stages"]])
    wins = _astronaut_windows(astronaut, p["width"], 60)
    passed, _ = rebuilt.evaluate_windows(wins)
    acc_cv, _ = _opencv_single_windows(xml, wins)
    np.testing.assert_array_equal(passed == len(rebuilt.stages), acc_cv)


def test_shipped_face_cascade_round_trips_through_our_writer(tmp_path: Path, astronaut: np.ndarray) -> None:
    """Read and rewritten by facepipe's XML code, the shipped cascade is the same detector
    to OpenCV: identical boxes on the whole photo, the face among them."""
    import cv2

    copy = write_cascade(read_cascade(SHIPPED), tmp_path / "copy.xml")
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    boxes = []
    for xml in (SHIPPED, copy):
        cc = cv2.CascadeClassifier(str(xml))
        assert not cc.empty()
        r, _, w = cc.detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=3, minSize=(24, 24),
                                       outputRejectLevels=True)
        boxes.append((np.asarray(r).reshape(-1, 4).tolist(), np.ravel(w).tolist()))
    assert boxes[0] == boxes[1]
    cx, cy = 181 + 87 / 2, 62 + 110 / 2  # centre of the tight face box
    assert any(x < cx < x + w and y < cy < y + h for x, y, w, h in boxes[0][0])


def test_detect_cli_finds_the_astronaut_with_the_shipped_cascade(astronaut_path: Path) -> None:
    res = CliRunner().invoke(cli, ["detect", "--detector", "haar", "--cascade", SHIPPED.name, "--format", "json",
                                   str(astronaut_path)])
    assert res.exit_code == 0, res.output
    faces = json.loads(res.output)[0]["faces"]
    assert faces and all(f["detector"] == "haar" for f in faces)
    best = max(faces, key=lambda f: f["det_response"])
    cx, cy = best["x"] + best["w"] / 2, best["y"] + best["h"] / 2
    assert abs(cx - (181 + 87 / 2)) < 20 and abs(cy - (62 + 110 / 2)) < 25


# ----------------------------------------------------------------------------- held-out stage thresholds
def test_calibration_split_holds_out_whole_groups() -> None:
    from facepipe.vj.train import calibration_split

    groups = np.repeat(np.arange(50), 4)  # 50 objects, 4 copies each (jitter, mirror)
    held = calibration_split(groups, 0.2, seed=1)
    assert held.sum() == 10 * 4
    for g in range(50):
        assert held[groups == g].all() or not held[groups == g].any()
    np.testing.assert_array_equal(held, calibration_split(groups, 0.2, seed=1))  # reproducible
    assert not np.array_equal(held, calibration_split(groups, 0.2, seed=2))
    with pytest.raises(ValueError, match="empty"):
        calibration_split(np.arange(3), 0.1, seed=0)


def test_stage_threshold_from_calibration_positives(problem) -> None:  # noqa: ANN001
    pos, neg = problem
    rng = np.random.default_rng(0)
    negw = neg.random_windows(400, rng)
    samples = np.concatenate([pos[:300], negw])
    cal = pos[300:600]
    y = np.r_[np.ones(300), -np.ones(len(negw))]
    ii, sq = integral_images(samples)
    vnf, _ = window_norm(ii, sq)
    cii, csq = integral_images(cal)
    feats = generate_features(S, S)
    stage, rep = train_stage(ii.reshape(len(samples), -1).astype(np.float64), vnf, y, feats,
                             rng.choice(len(feats), 1500, replace=False), StageSettings(0.99, 0.5, 30, "gentle", 32),
                             rng, calibration=(cii.reshape(len(cal), -1).astype(np.float64), window_norm(cii, csq)[0]))
    one = Cascade(S, S, feats, [stage])
    # the reported hit rate is the held-out positives', measured independently, and meets the target
    assert rep.n_calibration == len(cal)
    assert one.accepts(cal).mean() == pytest.approx(rep.hit_rate) and rep.hit_rate >= 0.99
    assert one.accepts(samples[:300]).mean() == pytest.approx(rep.train_hit_rate)
    assert one.accepts(samples[300:]).mean() == pytest.approx(rep.false_alarm) and rep.false_alarm <= 0.5
    # the threshold is the one the calibration sums call for, not the training positives'
    _, cal_sums = one.evaluate_windows(cal)
    assert stage.threshold == stage_threshold(cal_sums, 0.99)


def test_cascade_with_held_out_thresholds_keeps_unseen_positives(problem, tmp_path: Path) -> None:  # noqa: ANN001
    from facepipe.vj.train import calibration_split

    pos, neg = problem
    groups = np.arange(len(pos)) // 2
    params = replace(PARAMS, calibration_fraction=0.3, min_hit_rate=0.99)
    result = train_cascade(pos, neg, params, tmp_path / "cal.xml", groups=groups)
    held = calibration_split(groups, 0.3, params.seed)
    assert all(s["n_calibration"] > 0 and s["hit_rate"] >= 0.99 for s in result.stages)
    assert all("train_hit_rate" in s for s in result.stages)
    # every stage kept >= 0.99 of the held-out positives still alive, so the whole cascade keeps >= 0.99^k
    assert result.cascade.accepts(pos[held]).mean() >= 0.99 ** len(result.stages)
    assert load_state(tmp_path / "cal.xml")["positives"]["calibration"] == int(held.sum())
    with pytest.raises(ValueError, match="groups has"):
        train_cascade(pos, neg, params, tmp_path / "bad.xml", groups=groups[:-1])


def test_cli_calibration_fraction_holds_out_mirrored_pairs(synthetic_files: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "cal.xml"
    res = CliRunner().invoke(cli, ["train", "cascade", "--positives", synthetic_files["positives"], "--negatives",
                                   synthetic_files["negatives"], "--out", str(out), "--size", str(S), "--stages", "3",
                                   "--num-pos", "300", "--num-neg", "300", "--features-per-stage", "1000",
                                   "--bins", "32", "--mirror", "--calibration-fraction", "0.25", "-q"])
    assert res.exit_code == 0, res.output
    state = load_state(out)
    assert state["params"]["calibration_fraction"] == 0.25
    n_pos = state["positives"]["given"]
    # whole objects are held out: an image and its mirror image go together (an even count)
    assert state["positives"]["calibration"] % 2 == 0
    assert abs(state["positives"]["calibration"] - 0.25 * n_pos) <= 2
    assert all(s["n_calibration"] > 0 and s["hit_rate"] >= 0.995 for s in state["stage_stats"])
    bad = CliRunner().invoke(cli, ["train", "cascade", "--positives", synthetic_files["positives"], "--negatives",
                                   synthetic_files["negatives"], "--out", str(tmp_path / "b.xml"), "--size", str(S),
                                   "--calibration-fraction", "0.7"])
    assert bad.exit_code != 0 and "calibration-fraction" in bad.output

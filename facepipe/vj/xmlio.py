"""OpenCV cascade XML (the ``opencv-cascade-classifier`` format of OpenCV ≥ 2.4) for stump cascades.

Layout, as ``cv2.CascadeClassifier`` reads it (``CascadeClassifierImpl::Data::read``)::

    <opencv_storage><cascade type_id="opencv-cascade-classifier">
      stageType BOOST, featureType HAAR, height, width,
      stageParams {boostType, minHitRate, maxFalseAlarm, weightTrimRate, maxDepth 1, maxWeakCount},
      featureParams {maxCatCount 0, featSize 1, mode},
      stageNum, stages [ {maxWeakCount, stageThreshold,
                          weakClassifiers [ {internalNodes "0 -1 featureIdx threshold",
                                             leafValues "left right"} ]} ],
      features [ {rects ["x y w h weight", …], tilted 0} ]

For a stump, ``internalNodes`` are ``left right featureIdx threshold`` with
``left = 0`` and ``right = -1`` (leaf indices 0 and 1): ``leafValues[0]`` when
``value < threshold``, else ``leafValues[1]``. Numbers are written with 17
significant digits, so float32 values survive the text round trip exactly.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from facepipe.errors import CheckpointError, OutputError
from facepipe.vj.features import HaarFeatures
from facepipe.vj.model import Cascade, Stage, Stump

BOOST_CODES = {"gentle": "GAB", "real": "RAB", "discrete": "DAB"}


def _num(x: float) -> str:
    return f"{float(x):.16e}"


def cascade_to_xml(cascade: Cascade, comment: str = "") -> str:
    """The cascade (compacted to the features it uses) as OpenCV cascade XML text."""
    c = cascade.compact()
    p = c.params
    out = ['<?xml version="1.0"?>']
    if comment:
        out.append("<!--\n" + comment.replace("--", "- -").rstrip() + "\n-->")
    out.append("<opencv_storage>")
    out.append('<cascade type_id="opencv-cascade-classifier">')
    out.append("  <stageType>BOOST</stageType>")
    out.append("  <featureType>HAAR</featureType>")
    out.append(f"  <height>{c.height}</height>")
    out.append(f"  <width>{c.width}</width>")
    max_weak = max([len(s.stumps) for s in c.stages] + [int(p.get("max_weak", 1))])
    out.append("  <stageParams>")
    out.append(f"    <boostType>{BOOST_CODES.get(str(p.get('boost', 'gentle')), 'GAB')}</boostType>")
    out.append(f"    <minHitRate>{_num(p.get('min_hit_rate', 0.995))}</minHitRate>")
    out.append(f"    <maxFalseAlarm>{_num(p.get('max_false_alarm', 0.5))}</maxFalseAlarm>")
    out.append(f"    <weightTrimRate>{_num(p.get('weight_trim_rate', 1.0))}</weightTrimRate>")
    out.append("    <maxDepth>1</maxDepth>")
    out.append(f"    <maxWeakCount>{max_weak}</maxWeakCount></stageParams>")
    out.append("  <featureParams>")
    out.append("    <maxCatCount>0</maxCatCount>")
    out.append("    <featSize>1</featSize>")
    out.append(f"    <mode>{str(p.get('mode', 'basic')).upper()}</mode></featureParams>")
    out.append(f"  <stageNum>{len(c.stages)}</stageNum>")
    out.append("  <stages>")
    for i, st in enumerate(c.stages):
        out.append(f"    <!-- stage {i} -->")
        out.append("    <_>")
        out.append(f"      <maxWeakCount>{len(st.stumps)}</maxWeakCount>")
        out.append(f"      <stageThreshold>{_num(np.float32(st.threshold))}</stageThreshold>")
        out.append("      <weakClassifiers>")
        for s in st.stumps:
            out.append("        <_>")
            out.append("          <internalNodes>")
            out.append(f"            0 -1 {s.feature} {_num(np.float32(s.threshold))}</internalNodes>")
            out.append("          <leafValues>")
            out.append(f"            {_num(np.float32(s.left))} {_num(np.float32(s.right))}</leafValues></_>")
        out.append("      </weakClassifiers></_>")
    out.append("  </stages>")
    out.append("  <features>")
    f = c.features
    for k in range(len(f)):
        out.append("    <_>")
        out.append("      <rects>")
        rects = [(r, w) for r, w in zip(f.rects[k], f.weights[k]) if w != 0]
        for j, ((x, y, w, h), wt) in enumerate(rects):
            end = "</_></rects>" if j == len(rects) - 1 else "</_>"
            out.append("        <_>")
            out.append(f"          {x} {y} {w} {h} {float(wt):.1f}{end}")
        out.append("      <tilted>0</tilted></_>")
    out.append("  </features>")
    out.append("</cascade>")
    out.append("</opencv_storage>")
    return "\n".join(out) + "\n"


def write_cascade(cascade: Cascade, path: str | Path, comment: str = "") -> Path:
    """Write the cascade as OpenCV XML (atomically: a temporary file renamed into place)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(cascade_to_xml(cascade, comment))
        os.replace(tmp, p)
    except OSError as exc:
        raise OutputError(p, f"cannot write cascade ({exc.strerror or exc})") from exc
    return p


def _numbers(node: ET.Element | None, path: Path, what: str) -> list[str]:
    if node is None or node.text is None:
        raise CheckpointError(path, f"cascade XML lacks {what}")
    return node.text.split()


def read_cascade(path: str | Path) -> Cascade:
    """Read a stump-based HAAR cascade in OpenCV's XML format (ours or OpenCV's own).

    Tree cascades (more than one node per weak classifier) and tilted features load
    in OpenCV but not here: they raise :class:`CheckpointError`.
    """
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except FileNotFoundError as exc:
        raise CheckpointError(p, "cascade file not found") from exc
    except (OSError, ET.ParseError) as exc:
        raise CheckpointError(p, f"not a readable XML file ({exc})") from exc
    node = root.find("cascade") if root.tag == "opencv_storage" else None
    if node is None:
        node = next(iter(root), None) if root.tag == "opencv_storage" else None
    if node is None or node.find("stages") is None:
        raise CheckpointError(p, "not an OpenCV cascade XML file")
    if (node.findtext("stageType") or "").strip() != "BOOST" or (node.findtext("featureType") or "").strip() != "HAAR":
        raise CheckpointError(p, "only BOOST cascades of HAAR features are supported")
    try:
        width = int(node.findtext("width"))
        height = int(node.findtext("height"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(p, "cascade XML lacks width/height") from exc
    stages = []
    for st in node.find("stages").findall("_"):
        stumps = []
        for wc in st.find("weakClassifiers").findall("_") if st.find("weakClassifiers") is not None else []:
            nodes = _numbers(wc.find("internalNodes"), p, "internalNodes")
            leaves = _numbers(wc.find("leafValues"), p, "leafValues")
            if len(nodes) != 4 or len(leaves) != 2 or nodes[:2] != ["0", "-1"]:
                raise CheckpointError(p, "tree-based cascades are not supported (stumps only)")
            stumps.append(Stump(int(nodes[2]), float(np.float32(nodes[3])),
                                float(np.float32(leaves[0])), float(np.float32(leaves[1]))))
        try:
            thr = float(np.float32(st.findtext("stageThreshold")))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(p, "stage without stageThreshold") from exc
        stages.append(Stage(stumps, thr))
    rects, weights = [], []
    feats = node.find("features")
    for ft in feats.findall("_") if feats is not None else []:
        if (ft.findtext("tilted") or "0").strip() not in ("0", ""):
            raise CheckpointError(p, "tilted features are not supported")
        r = np.zeros((3, 4), np.int32)
        w = np.zeros(3, np.float32)
        for j, rr in enumerate(ft.find("rects").findall("_")):
            vals = rr.text.split()
            if j >= 3 or len(vals) != 5:
                raise CheckpointError(p, "feature rect must be 'x y w h weight' (at most 3 rects)")
            r[j] = [int(float(v)) for v in vals[:4]]
            w[j] = float(vals[4])
        rects.append(r)
        weights.append(w)
    n_feat = len(rects)
    for st in stages:
        for s in st.stumps:
            if not 0 <= s.feature < n_feat:
                raise CheckpointError(p, f"stump uses feature {s.feature} of {n_feat}")
    features = HaarFeatures(width, height, np.array(rects, np.int32).reshape(-1, 3, 4),
                            np.array(weights, np.float32).reshape(-1, 3))
    params: dict[str, object] = {}
    sp = node.find("stageParams")
    if sp is not None:
        codes = {v: k for k, v in BOOST_CODES.items()}
        if sp.findtext("boostType"):
            params["boost"] = codes.get(sp.findtext("boostType").strip(), sp.findtext("boostType").strip())
        for tag, key in (("minHitRate", "min_hit_rate"), ("maxFalseAlarm", "max_false_alarm")):
            if sp.findtext(tag):
                params[key] = float(sp.findtext(tag))
    fp = node.find("featureParams")
    if fp is not None and fp.findtext("mode"):
        params["mode"] = fp.findtext("mode").strip().lower()
    return Cascade(width, height, features, stages, params)

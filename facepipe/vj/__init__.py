"""Viola–Jones cascade training that writes OpenCV cascade XML.

* :mod:`facepipe.vj.features` — Haar-like features, integral images, OpenCV's window normalisation;
* :mod:`facepipe.vj.model` — the cascade and its exact (OpenCV-identical) evaluation on windows and images;
* :mod:`facepipe.vj.boost` — one stage: boosted stumps (gentle / real / discrete AdaBoost);
* :mod:`facepipe.vj.samples` — positive windows and bootstrapped negative windows;
* :mod:`facepipe.vj.train` — the attentional cascade, stage by stage, resumable;
* :mod:`facepipe.vj.xmlio` — OpenCV cascade XML writer and reader;
* :mod:`facepipe.vj.facedata` — the development face data as cascade samples.
"""

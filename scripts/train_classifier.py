#!/usr/bin/env python
"""Reproduce the shipped face-classifier weights: same as ``facepipe train classifier``.

Example (GPU, minutes)::

    python scripts/train_classifier.py --device cuda --install

On the 2-core CPU of the development machine the default schedule takes about
half an hour (see docs/detection.md for the measured times).
"""

from facepipe.commands.train_classifier import classifier

if __name__ == "__main__":
    classifier(prog_name="train_classifier.py")

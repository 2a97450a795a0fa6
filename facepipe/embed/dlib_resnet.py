"""dlib's face-recognition ResNet as a PyTorch module, and its weights from dlib's own file.

Topology (``examples/dnn_face_recognition_ex.cpp``, test-time form), forward order::

    150×150 RGB, (pixel − mean) / 256
    conv 7×7/2 (32, no padding) → affine → ReLU → max-pool 3×3/2 (no padding)     72 → 35
    3 × res(32) → res_down(64) + 3 × res(64) → res_down(128) + 2 × res(128)
      → res_down(256) + 2 × res(256) → res_down(256)                               35→17→8→4→2
    global average pool → fc 256→128 (no bias)                                     raw 128-d vector

    res(N):      x + affine(conv3×3(relu(affine(conv3×3(x))))) → ReLU        (3×3 convs padded by 1)
    res_down(N): avgpool2×2/2(x) ⊕ affine(conv3×3(relu(affine(conv3×3/2(x))))) → ReLU
                 (the stride-2 conv is unpadded; ⊕ adds with zero padding of the
                 smaller tensor's channels and bottom/right border, as dlib's ``add_prev``)

``affine`` is dlib's test-time batch norm: a per-channel ``gamma·x + beta``. The same
module with other ``blocks``/``stem``/``dim`` gives slimmer students of the same
family (:func:`build_dlib_resnet`); ``head`` replaces the final fc by a new embedding
head (transfer learning on the frozen trunk).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from facepipe.embed.dlib_format import (
    FACE_RESNET_BLOCKS, FACE_RESNET_DIM, FACE_RESNET_STEM, DlibNetwork, read_face_resnet_file,
)

if TYPE_CHECKING:
    import torch

import torch
import torch.nn.functional as F
from torch import nn

#: Provenance of the converted weights (also written into every checkpoint derived from them).
DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_MODEL_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
DLIB_PROVENANCE = (f"{DLIB_MODEL_FILE} by Davis King, public domain (davisking/dlib-models), "
                   f"from PyPI face_recognition_models==0.3.0, sha256 {DLIB_MODEL_SHA256}")


class Affine(nn.Module):
    """dlib's ``affine_`` layer: per-channel ``gamma · x + beta`` (a frozen batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta.view(1, -1, 1, 1), x, self.gamma.view(1, -1, 1, 1))


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` where the smaller tensor is zero-padded (channels, bottom, right): dlib's ``tt::add``."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class ResBlock(nn.Module):
    """One ``ares`` / ``ares_down`` unit (see the module docstring)."""

    def __init__(self, cin: int, n: int, down: bool) -> None:
        super().__init__()
        self.down = bool(down)
        s = 2 if down else 1
        self.conv1 = nn.Conv2d(cin, n, 3, stride=s, padding=0 if down else 1)
        self.affine1 = Affine(n)
        self.conv2 = nn.Conv2d(n, n, 3, stride=1, padding=1)
        self.affine2 = Affine(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_padded(skip, y))


class Stem(nn.Module):
    """conv 7×7/2 → affine → ReLU → max-pool 3×3/2, all unpadded."""

    def __init__(self, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, cout, 7, stride=2, padding=0)
        self.affine = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)


class DlibFaceResNet(nn.Module):
    """dlib's face ResNet (or a slimmer/deeper member of the family) with an embedding head.

    ``head=None``: dlib's own ``fc_no_bias`` (``fc``, trunk width → ``dim``), output = the
    raw fc vector, as dlib. ``head={"type": "mlp", "hidden": H}`` or ``{"type": "linear"}``:
    a new head on the pooled trunk features (``fc`` is then the new head's last layer;
    ``head_bn`` adds a batch norm after it).
    """

    def __init__(self, blocks: Sequence[Sequence[Any]] = FACE_RESNET_BLOCKS, stem: int = FACE_RESNET_STEM,
                 dim: int = FACE_RESNET_DIM, head: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.blocks_spec = [(int(n), bool(d)) for n, d in blocks]
        self.stem = Stem(int(stem))
        layers, cin = [], int(stem)
        for n, down in self.blocks_spec:
            layers.append(ResBlock(cin, n, down))
            cin = max(cin, n)  # add_prev widens to the larger channel count
        self.blocks = nn.Sequential(*layers)
        self.width = cin
        self.head_spec = dict(head) if head else None
        self.hidden: nn.Module | None = None
        self.head_bn: nn.Module | None = None
        if self.head_spec and self.head_spec.get("type") == "mlp":
            h = int(self.head_spec.get("hidden", 512))
            self.hidden = nn.Sequential(nn.Linear(cin, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True))
            cin = h
        self.fc = nn.Linear(cin, int(dim), bias=False)
        if self.head_spec and self.head_spec.get("bn"):
            self.head_bn = nn.BatchNorm1d(int(dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features ``(N, width)`` (what a transfer head is trained on)."""
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        """Embedding head on pooled features (unnormalised)."""
        if self.hidden is not None:
            f = self.hidden(f)
        e = self.fc(f)
        return self.head_bn(e) if self.head_bn is not None else e

    def forward_unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """The raw embedding (dlib's descriptor for the port)."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward_unnormalised(x).float(), dim=1)


def fuse_affines(net: DlibFaceResNet) -> DlibFaceResNet:
    """An inference copy with every affine folded into the conv before it (same outputs, fewer passes)."""
    out = copy.deepcopy(net).eval()
    pairs = [(out.stem.conv, out.stem.affine)]
    for b in out.blocks:
        pairs += [(b.conv1, b.affine1), (b.conv2, b.affine2)]
    with torch.no_grad():
        for conv, aff in pairs:
            g = aff.gamma.detach()
            conv.weight.mul_(g.view(-1, 1, 1, 1))
            conv.bias.copy_(conv.bias * g + aff.beta)
            aff.gamma.fill_(1.0)
            aff.beta.zero_()
    for _, aff in pairs:
        aff.forward = lambda x: x  # type: ignore[method-assign]
    return out


def state_dict_from_dlib(dnet: DlibNetwork) -> dict[str, torch.Tensor]:
    """Map the reader's named arrays onto :class:`DlibFaceResNet`'s parameter names."""
    sd: dict[str, torch.Tensor] = {}
    for name, a in dnet.arrays.items():
        layer, _, what = name.rpartition(".")
        if what == "filters":
            sd[f"{layer}.weight"] = torch.from_numpy(np.ascontiguousarray(a))
        elif what == "biases":
            sd[f"{layer}.bias"] = torch.from_numpy(np.ascontiguousarray(a))
        elif what in ("gamma", "beta"):
            sd[name] = torch.from_numpy(np.ascontiguousarray(a))
        elif name == "fc.weights":
            sd["fc.weight"] = torch.from_numpy(np.ascontiguousarray(a.T))  # dlib keeps (inputs, outputs)
        else:  # pragma: no cover - reader and module out of sync
            raise KeyError(name)
    return sd


def dlib_arch() -> dict[str, Any]:
    """The ``arch`` record of dlib's own network."""
    return {"backbone": "dlib_resnet", "stem": FACE_RESNET_STEM,
            "blocks": [[n, d] for n, d in FACE_RESNET_BLOCKS], "dim": FACE_RESNET_DIM, "head": None}


def build_dlib_resnet(arch: Mapping[str, Any]) -> DlibFaceResNet:
    """A :class:`DlibFaceResNet` from an ``arch`` record (``stem``, ``blocks``, ``dim``, ``head``)."""
    blocks = arch.get("blocks", FACE_RESNET_BLOCKS)
    if not blocks or any(len(b) != 2 or int(b[0]) < 1 for b in blocks):
        raise ValueError(f"bad dlib_resnet blocks {blocks!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(arch.get("init_seed", 0)))
        return DlibFaceResNet(blocks, int(arch.get("stem", FACE_RESNET_STEM)),
                              int(arch.get("dim", FACE_RESNET_DIM)), arch.get("head"))


def port_from_file(path: str | Path) -> tuple[DlibFaceResNet, DlibNetwork]:
    """Read dlib's ``.dat`` (numpy reader) and load it into the torch module."""
    dnet = read_face_resnet_file(path)
    net = build_dlib_resnet(dlib_arch())
    sd = state_dict_from_dlib(dnet)
    res = net.load_state_dict(sd, strict=True)
    del res
    return net.eval(), dnet

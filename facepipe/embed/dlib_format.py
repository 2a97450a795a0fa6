"""A numpy-only reader of dlib's serialised DNN files, for dlib's face-recognition ResNet.

dlib writes a network with its own binary serialisation (``dlib/serialize.h``,
``dlib/dnn/core.h``, ``dlib/dnn/layers.h``, ``dlib/cuda/tensor.h``). The facts this
reader relies on, checked against ``dlib_face_recognition_resnet_model_v1.dat``:

* integers: a control byte (``0x80`` = negative, low 4 bits = byte count, 1..8) then
  that many little-endian bytes; a float is ``mantissa`` then ``exponent`` (two such
  integers; value = mantissa·2^exponent; exponents 32000/32001/32002 mean +inf/−inf/NaN);
  a string is its length then the bytes; a bool is the ASCII byte ``'0'`` or ``'1'``;
* a tensor is ``version 2, n, k, nr, nc`` then ``n·k·nr·nc`` raw little-endian float32;
  an alias tensor (a view into a layer's ``params``) is ``version 1, n, k, nr, nc``;
* a network is nested: the loss layer writes its version, its details, then the whole
  sub-network; an ``add_layer`` writes its version, then its *whole sub-network*, then
  its own details and some state (three bools, ``x_grad``, ``cached_output`` and, for
  version 2, ``params_grad``), so versions come outer-to-inner and layer details
  inner-to-outer. The innermost ``add_layer`` also holds the input layer (versions 2–3,
  with ``grad_final`` and, for 3, the sample expansion factor);
* tag and skip layers write only ``version 1`` and their sub-network: which tag a skip
  or ``add_prev`` refers to is in the C++ type, not the file, so the topology has to be
  declared in code (:func:`face_resnet_schema`, from ``examples/dnn_face_recognition_ex.cpp``).

:func:`read_face_resnet` walks that schema over the bytes, checks every layer's
version string and hyper-parameters against it, splits each layer's ``params`` tensor
into its aliases (conv filters/biases, affine gamma/beta, fc weights) and raises
:class:`CheckpointError` unless the file is consumed exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import CheckpointError

#: Residual blocks of dlib's face ResNet in forward order: (filters, downsampling).
#: ``alevel4`` (3×32) → ``alevel3`` (down 64, 3×64) → ``alevel2`` (down 128, 2×128)
#: → ``alevel1`` (down 256, 2×256) → ``alevel0`` (down 256).
FACE_RESNET_BLOCKS: tuple[tuple[int, bool], ...] = (
    (32, False), (32, False), (32, False),
    (64, True), (64, False), (64, False), (64, False),
    (128, True), (128, False), (128, False),
    (256, True), (256, False), (256, False),
    (256, True),
)
FACE_RESNET_STEM = 32
FACE_RESNET_DIM = 128
FACE_RESNET_INPUT = 150

_INF, _NINF, _NAN = 32000, 32001, 32002


@dataclass(frozen=True)
class LayerSpec:
    """One dlib layer of the declared topology.

    ``kind``: ``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``, ``add_prev``,
    ``tag``, ``skip`` or ``fc``. ``name``: where its arrays go (parametric layers only).
    ``args``: ``con`` (filters, nr, nc, stride_y, stride_x), pools (nr, nc, stride_y,
    stride_x), ``fc`` (outputs,), tag/skip/add_prev (tag id,).
    """

    kind: str
    name: str = ""
    args: tuple[int, ...] = ()


def face_resnet_schema(blocks: tuple[tuple[int, bool], ...] = FACE_RESNET_BLOCKS,
                       stem: int = FACE_RESNET_STEM, dim: int = FACE_RESNET_DIM) -> list[LayerSpec]:
    """dlib's ``anet_type`` as a flat list of layers, **outermost first** (fc … stem conv).

    C++ (``dnn_face_recognition_ex.cpp``)::

        block<N,BN,stride,S>  = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,S>>>>>
        residual<…,S>         = add_prev1<block<N,BN,1,tag1<S>>>
        residual_down<…,S>    = add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,BN,2,tag1<S>>>>>>
        ares / ares_down      = relu<residual / residual_down>
        anet = loss_metric<fc_no_bias<128,avg_pool_everything<alevel0<…alevel4<
               max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>>>>>>>
    """
    fwd: list[LayerSpec] = [LayerSpec("con", "stem.conv", (stem, 7, 7, 2, 2)), LayerSpec("affine", "stem.affine"),
                            LayerSpec("relu"), LayerSpec("max_pool", "", (3, 3, 2, 2))]
    for i, (n, down) in enumerate(blocks):
        p = f"blocks.{i}"
        s = 2 if down else 1
        fwd += [LayerSpec("tag", "", (1,)), LayerSpec("con", f"{p}.conv1", (n, 3, 3, s, s)),
                LayerSpec("affine", f"{p}.affine1"), LayerSpec("relu"),
                LayerSpec("con", f"{p}.conv2", (n, 3, 3, 1, 1)), LayerSpec("affine", f"{p}.affine2")]
        if down:
            fwd += [LayerSpec("tag", "", (2,)), LayerSpec("skip", "", (1,)),
                    LayerSpec("avg_pool", "", (2, 2, 2, 2)), LayerSpec("add_prev", "", (2,))]
        else:
            fwd += [LayerSpec("add_prev", "", (1,))]
        fwd.append(LayerSpec("relu"))
    fwd += [LayerSpec("avg_pool", "", (0, 0, 1, 1)), LayerSpec("fc", "fc", (dim,))]
    return fwd[::-1]


@dataclass
class DlibNetwork:
    """What :func:`read_face_resnet` found: named float32 arrays plus the input and loss settings.

    Array names: ``<layer>.filters`` (out, in, kh, kw) and ``<layer>.biases`` (out,) for
    convolutions, ``<layer>.gamma`` / ``<layer>.beta`` (channels,) for affine layers and
    ``fc.weights`` in dlib's own (inputs, outputs) layout.
    """

    arrays: dict[str, np.ndarray]
    input_mean: tuple[float, float, float]
    input_size: int
    loss: dict[str, Any]
    versions: list[str] = field(default_factory=list)
    n_bytes: int = 0
    sha256: str = ""


class _Reader:
    """Sequential reader of dlib's primitive encodings with offsets in its errors."""

    def __init__(self, data: bytes, source: str) -> None:
        self.b = memoryview(data)
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(self.source, f"not a dlib face ResNet file: {what} (byte offset {self.pos})")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.b):
            raise self.fail(f"truncated (wanted {n} more bytes, {len(self.b) - self.pos} left)")
        out = self.b[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        ctrl = self.take(1)[0]
        size = ctrl & 0x0F
        if size == 0 or size > 8 or ctrl & 0x70:
            self.pos -= 1
            raise self.fail(f"bad integer control byte 0x{ctrl:02x}")
        v = int.from_bytes(self.take(size), "little")
        return -v if ctrl & 0x80 else v

    def float(self) -> float:
        if self.pos < len(self.b) and self.b[self.pos] & 0x70:
            raise self.fail("old ASCII float encoding (not supported)")
        mant, exp = self.int(), self.int()
        if exp == _INF:
            return math.inf
        if exp == _NINF:
            return -math.inf
        if exp == _NAN:
            return math.nan
        return math.ldexp(mant, exp)

    def string(self) -> str:
        n = self.int()
        if n > 1024:
            raise self.fail(f"implausible string length {n}")
        raw = bytes(self.take(n))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"non-ASCII layer name {raw[:20]!r}") from None

    def bool(self) -> bool:
        c = self.take(1)[0]
        if c not in (0x30, 0x31):
            self.pos -= 1
            raise self.fail(f"bad bool byte 0x{c:02x}")
        return c == 0x31

    def version(self, allowed: tuple[int, ...], what: str) -> int:
        v = self.int()
        if v not in allowed:
            raise self.fail(f"{what} version {v}, expected one of {allowed}")
        return v

    def dims(self) -> tuple[int, int, int, int]:
        d = (self.int(), self.int(), self.int(), self.int())
        if any(x < 0 for x in d):
            raise self.fail(f"negative tensor dimension {d}")
        return d  # type: ignore[return-value]

    def tensor(self) -> np.ndarray:
        self.version((2,), "tensor")
        d = self.dims()
        n = int(np.prod(d, dtype=np.int64))
        raw = self.take(4 * n)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(d)

    def alias(self) -> tuple[int, int, int, int]:
        self.version((1,), "alias tensor")
        return self.dims()


def _split(params: np.ndarray, shapes: list[tuple[int, ...]], r: _Reader, what: str) -> list[np.ndarray]:
    flat = params.reshape(-1)
    need = sum(int(np.prod(s)) for s in shapes)
    if need != flat.size:
        raise r.fail(f"{what}: params tensor has {flat.size} values, its aliases need {need}")
    out, off = [], 0
    for s in shapes:
        k = int(np.prod(s))
        out.append(flat[off:off + k].reshape(s).copy())
        off += k
    return out


def _read_details(r: _Reader, spec: LayerSpec, arrays: dict[str, np.ndarray], versions: list[str],
                  channels: list[int]) -> None:
    """One layer's own details (after its sub-network), checked against ``spec``."""
    ver = r.string()
    versions.append(ver)
    kind = spec.kind
    if kind == "con":
        if ver not in ("con_4", "con_5", "con_6"):
            raise r.fail(f"expected a con_ layer for {spec.name}, found {ver!r}")
        params = r.tensor()
        num_filters = r.int()
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        f_shape, b_shape = r.alias(), r.alias()
        for _ in range(4):  # learning-rate / weight-decay multipliers
            r.float()
        use_bias = r.bool() if ver in ("con_5", "con_6") else True
        if ver == "con_6":
            r.bool()  # use_relu (fused relu, off in this network)
        n, kh, kw, stride = spec.args[0], spec.args[1], spec.args[2], spec.args[3]
        pad = 0 if stride != 1 else kh // 2
        if (num_filters, nr, nc, sy, sx, py, px) != (n, kh, kw, stride, stride, pad, pad):
            raise r.fail(f"{spec.name}: found con {num_filters} filters {nr}x{nc} stride {sy},{sx} "
                         f"padding {py},{px}; expected {n} {kh}x{kw} stride {stride} padding {pad}")
        if f_shape[0] != n or f_shape[2:] != (kh, kw) or f_shape[1] != channels[-1]:
            raise r.fail(f"{spec.name}: filter alias {f_shape} does not match {n}x{channels[-1]}x{kh}x{kw}")
        shapes = [f_shape] + ([b_shape] if use_bias else [])
        parts = _split(params, shapes, r, spec.name)
        arrays[f"{spec.name}.filters"] = parts[0]
        arrays[f"{spec.name}.biases"] = parts[1].reshape(-1) if use_bias else np.zeros(n, np.float32)
        channels.append(n)
    elif kind == "affine":
        if ver not in ("affine_", "affine_2"):
            raise r.fail(f"expected an affine_ layer for {spec.name}, found {ver!r} "
                         "(only the test-time network with affine layers is supported)")
        params = r.tensor()
        g_shape, b_shape = r.alias(), r.alias()
        mode = r.int()
        if ver == "affine_2" and r.bool():
            raise r.fail(f"{spec.name}: disabled affine layer")
        if mode != 0:
            raise r.fail(f"{spec.name}: affine mode {mode}, expected 0 (per channel)")
        gamma, beta = _split(params, [g_shape, b_shape], r, spec.name)
        if gamma.size != channels[-1]:
            raise r.fail(f"{spec.name}: {gamma.size} affine channels after {channels[-1]}-channel layer")
        arrays[f"{spec.name}.gamma"] = gamma.reshape(-1)
        arrays[f"{spec.name}.beta"] = beta.reshape(-1)
    elif kind == "relu":
        if ver == "relu_2":
            if r.bool():
                raise r.fail("disabled relu layer")
        elif ver != "relu_":
            raise r.fail(f"expected a relu_ layer, found {ver!r}")
    elif kind in ("max_pool", "avg_pool"):
        if ver != f"{kind}_2":
            raise r.fail(f"expected {kind}_2, found {ver!r}")
        got = tuple(r.int() for _ in range(6))
        nr, nc, sy, sx = spec.args
        pad = 0 if sy != 1 else nr // 2
        if got != (nr, nc, sy, sx, pad, pad):
            raise r.fail(f"{kind}: found window/stride/padding {got}, expected {(nr, nc, sy, sx, pad, pad)}")
    elif kind == "add_prev":
        if ver != "add_prev_":
            raise r.fail(f"expected add_prev_, found {ver!r}")
    elif kind == "fc":
        if ver not in ("fc_2", "fc_3"):
            raise r.fail(f"expected an fc_ layer, found {ver!r}")
        num_outputs, num_inputs = r.int(), r.int()
        params = r.tensor()
        w_shape, _b_shape = r.alias(), r.alias()
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        if ver == "fc_3":
            r.bool()
        if bias_mode != 1:
            raise r.fail(f"fc bias mode {bias_mode}, expected 1 (fc_no_bias)")
        if num_outputs != spec.args[0] or w_shape[:2] != (num_inputs, num_outputs) or num_inputs != channels[-1]:
            raise r.fail(f"fc {num_inputs}->{num_outputs} (alias {w_shape}) does not follow the "
                         f"{channels[-1]}-channel trunk into {spec.args[0]} outputs")
        (w,) = _split(params, [(num_inputs, num_outputs)], r, "fc")
        arrays["fc.weights"] = w
    else:  # pragma: no cover - schema bug
        raise ValueError(f"unknown layer kind {kind}")


def read_face_resnet(data: bytes, source: str | Path = "<bytes>",
                     schema: list[LayerSpec] | None = None) -> DlibNetwork:
    """Parse a serialised ``loss_metric<…face ResNet…>`` network; every byte must be consumed."""
    schema = face_resnet_schema() if schema is None else schema
    r = _Reader(bytes(data), str(source))
    arrays: dict[str, np.ndarray] = {}
    versions: list[str] = []
    channels = [3]
    info: dict[str, Any] = {}

    r.version((1,), "loss layer")
    lv = r.string()
    if lv == "loss_metric_2":
        loss = {"type": "loss_metric", "margin": r.float(), "distance_threshold": r.float()}
    elif lv == "loss_metric_":
        loss = {"type": "loss_metric", "margin": 0.1, "distance_threshold": 0.75}
    else:
        raise r.fail(f"expected a loss_metric_ layer, found {lv!r}")
    versions.append(lv)

    def read_input() -> None:
        iv = r.string()
        versions.append(iv)
        if iv not in ("input_rgb_image_sized", "input_rgb_image"):
            raise r.fail(f"expected an RGB input layer, found {iv!r}")
        info["mean"] = (r.float(), r.float(), r.float())
        info["size"] = 0
        if iv == "input_rgb_image_sized":
            nr, nc = r.int(), r.int()
            if nr != nc:
                raise r.fail(f"non-square input {nr}x{nc}")
            info["size"] = nr

    def read_layer(i: int) -> None:
        spec = schema[i]
        if spec.kind in ("tag", "skip"):
            r.version((1,), f"{spec.kind}{spec.args[0]} layer")
            read_layer(i + 1)
            return
        innermost = i == len(schema) - 1
        if innermost:
            v = r.version((2, 3), "input add_layer")
            read_input()
        else:
            v = r.version((1, 2), "add_layer")
            read_layer(i + 1)
        _read_details(r, spec, arrays, versions, channels)
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output…_disabled
            r.bool()
        r.tensor()  # x_grad
        r.tensor()  # cached_output
        if innermost:
            r.tensor()  # grad_final
            if v >= 3:
                r.int()  # _sample_expansion_factor
        elif v == 2:
            r.tensor()  # params_grad

    read_layer(0)
    if r.pos != len(r.b):
        raise r.fail(f"{len(r.b) - r.pos} unread bytes after the network")
    return DlibNetwork(arrays=arrays, input_mean=tuple(float(m) for m in info["mean"]),  # type: ignore[arg-type]
                       input_size=int(info["size"]), loss=loss, versions=versions, n_bytes=len(r.b),
                       sha256=hashlib.sha256(bytes(data)).hexdigest())


def read_face_resnet_file(path: str | Path) -> DlibNetwork:
    """:func:`read_face_resnet` on a file; :class:`CheckpointError` naming it when missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "no such dlib model file")
    return read_face_resnet(p.read_bytes(), p)


__all__ = ["DlibNetwork", "LayerSpec", "FACE_RESNET_BLOCKS", "face_resnet_schema", "read_face_resnet",
           "read_face_resnet_file"]

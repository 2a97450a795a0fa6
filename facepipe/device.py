"""Resolve a user's device string to a torch device, never silently falling back."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from facepipe.errors import DeviceUnavailableError

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str = "auto") -> "torch.device":
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a :class:`torch.device`.

    ``auto`` picks the first CUDA GPU when there is one, else the CPU. Asking for
    CUDA on a machine without it raises :class:`DeviceUnavailableError`.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if not _DEVICE_RE.match(spec):
        raise DeviceUnavailableError(
            f"invalid device {spec!r}; use auto, cpu, cuda or cuda:N"
        )
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {spec!r} requested but CUDA is not available on this machine"
            )
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return torch.device(spec)


def validate_device_spec(spec: str) -> str:
    """Check a device string's syntax without importing torch; return it normalised."""
    s = (spec or "auto").strip().lower()
    if not _DEVICE_RE.match(s):
        raise DeviceUnavailableError(f"invalid device {spec!r}; use auto, cpu, cuda or cuda:N")
    return s


def describe_machine() -> str:
    """One line naming this machine's CPU (and GPU, if torch sees one), for benchmark reports."""
    import os
    import platform
    from pathlib import Path

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} x {cpu}{gpu}, Python {platform.python_version()}"

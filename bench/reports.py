"""What every benchmark report carries: the environment it ran in, and how it is written to disk."""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import platform
import re
from typing import Any

import jax
import numpy as np


def environment() -> dict[str, Any]:
    """Device, platform, versions and the time of the run."""
    import jaxlib

    device = jax.devices()[0]
    return {"device": str(device), "device_kind": device.device_kind, "platform": jax.default_backend(),
            "device_count": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def device_slug() -> str:
    """The device kind as a file-name part (``nvidia-h100-80gb-hbm3``)."""
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-") or jax.default_backend()


def save_json(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Writes ``report`` as indented JSON (numpy scalars as numbers, non-finite floats as null)."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return out


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x) if math.isfinite(x) else None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")

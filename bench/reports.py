"""What every benchmark report carries: the environment it ran in, how a failed measurement is recorded
(one line; ``oom`` or ``skipped``), and how the report is written to disk."""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import platform
import re
from typing import Any, Callable, Mapping

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


def error_line(err: BaseException) -> str:
    """An exception as the one line a report records for a measurement it could not make."""
    text = f"{type(err).__name__}: {str(err).strip()}"
    return text.splitlines()[0][:300] if text else type(err).__name__


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` says the device (or host) ran out of memory."""
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or isinstance(err, MemoryError)


def failed_cell(err: BaseException) -> dict[str, str]:
    """A measurement's report cell when it raised: ``oom`` or ``skipped``, and the one-line reason."""
    return {"status": "oom" if is_oom(err) else "skipped", "reason": error_line(err)}


def backend_choices(choices: Mapping[str, Callable[[], Any]]) -> dict[str, dict[str, str | None]]:
    """Per op, the implementation its ``backend_for`` (a call of no arguments) picks and why; a refusal's
    reason where it picks none."""
    out = {}
    for op, backend_for in choices.items():
        try:
            backend = backend_for()
            out[op] = {"name": backend.name, "reason": backend.reason}
        except ValueError as err:
            out[op] = {"name": None, "reason": error_line(err)}
    return out


def length_label(T: int) -> str:
    """A length as the tables and plots print it: 4K for 4096, else the number."""
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


def not_timed_lines(rows) -> list[str]:
    """The table's closing lines for the cells of ``rows`` ((label, {length: cell}) pairs) that hold no timing:
    one line per label and reason, with the lengths it applies to; none when every cell is timed."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for label, cells in rows:
        for T, c in cells.items():
            if c.get("status") != "ok":
                reasons.setdefault((label, c["reason"]), []).append(length_label(int(T)))
    return ["", *[f"not timed: {label} at {', '.join(Ts)}: {reason}" for (label, reason), Ts in reasons.items()]
            ] if reasons else []


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

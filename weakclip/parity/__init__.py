"""Parity with released code: compare our computation with tensors recorded by running the authors' code.

A fixture is a folder with ``config.json`` and safetensors files (see ``../shared/reference/parity``). Each
fixture kind registers a checker that fills a :class:`ParityReport`; :func:`check_fixture` picks the
checker from the fixture's ``config.json`` (its ``kind``, else the released repository it names).
``benchmarks/parity.py`` and the tests call the same code.

Bounds are derived, not fitted, and hold on any CPU. Each float comparison allows

    |ours - ref| <= RTOL * (|ref| + max|ref|) + FP64_FACTOR * max|ours_fp32 - ours_fp64| (+ extra)

The first term is float32 arithmetic in another order (fused kernels, other BLAS blocking, regrouped
sums): about 1e-7 relative per operation, compounded to ~1e-6 by deep stacks, so ``RTOL`` = 1e-5 leaves a
margin of ten. Where a computation amplifies rounding (Grad-CAM's min-max normalisation divides by a small
spread), the second term measures what float32 rounding does to *this* computation: the same code run in
float64 is within float32 rounding of the exact result, so ``max|ours_fp32 - ours_fp64|`` is our own
rounding error, and the reference, another float32 run of the same arithmetic on another CPU, has one of
the same size; ``FP64_FACTOR`` = 4 covers both with a margin of two. A real bug (a dropped bias, a wrong
resize) is in the float64 run too, so it still fails. ``extra`` is for tensors the released code stores
rounded: one float16 unit in the last place of the reference value (:func:`fp16_ulp`), or, for CRF
marginals, which pydensecrf computes in float32 only (no float64 run exists), a fixed bound named by the
checker.

Label maps decided by float scores may differ only at pixels whose decision margin (top-2 gap, or the
distance of a confidence from its threshold) is within the bound of the scores it decides on; those
pixels are counted in ``allowed`` and reported, any other differing pixel fails. Integer outputs that do
not come from a float decision (token ids, boxes, kept classes) must be identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import WeakclipError

RTOL = 1e-5
FP64_FACTOR = 4.0


def _as_double(x: Tensor | np.ndarray | float) -> Tensor:
    return torch.as_tensor(x).detach().double().cpu()


def fp16_ulp(x: Tensor | np.ndarray) -> Tensor:
    """One float16 unit in the last place at each value of ``x`` (subnormal spacing 2^-24 near 0)."""
    a = _as_double(x).abs().clamp_min(2.0**-14)
    return torch.exp2(torch.floor(torch.log2(a)) - 10)


def top2_margin(scores: Tensor | np.ndarray, dim: int = 0) -> Tensor:
    """Gap between the best and the second-best score along ``dim`` (the argmax's decision margin)."""
    s = _as_double(scores)
    top = s.topk(2, dim=dim).values
    return top.select(dim, 0) - top.select(dim, 1)


@dataclass
class ParityReport:
    """Per compared tensor its worst error and bound, the label pixels allowed by their margin, and failures.

    ``worst[name]``: ``max_abs`` (worst |ours - ref|), ``bound`` (the largest allowance), ``used`` (the
    largest |ours - ref| / allowance; a pass needs <= 1) and, for label maps, ``differ`` (pixels that differ).
    """

    worst: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    allowed: dict[str, int] = field(default_factory=dict)
    recorded: list[str] = field(default_factory=list)

    def _shapes_agree(self, name: str, a: Tensor, b: Tensor) -> bool:
        if tuple(a.shape) == tuple(b.shape):
            return True
        self.worst[name] = {"max_abs": float("inf"), "bound": 0.0, "used": float("inf")}
        self.failed.append(f"{name}: shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        return False

    def close(self, name: str, ours: Tensor | np.ndarray, ref: Tensor | np.ndarray,
              fp64: Tensor | np.ndarray | None = None, rtol: float = RTOL,
              extra: float | Tensor = 0.0) -> bool:
        """Judge a float tensor against the bound of the module docstring; ``fp64`` is the same tensor from
        the float64 run (omit it only where the computation has no float64 form)."""
        a, b = _as_double(ours), _as_double(ref)
        if not self._shapes_agree(name, a, b):
            return False
        bound = rtol * (b.abs() + (b.abs().max() if b.numel() else 0.0)) + _as_double(extra)
        if fp64 is not None:
            d = _as_double(fp64)
            if not self._shapes_agree(name, a, d):
                return False
            bound = bound + FP64_FACTOR * ((a - d).abs().max() if a.numel() else 0.0)
        diff = (a - b).abs()
        bound = bound.expand_as(diff)
        used = diff / bound.clamp_min(1e-300)
        used[diff == 0] = 0
        entry = {"max_abs": float(diff.max()) if diff.numel() else 0.0,
                 "bound": float(bound.max()) if bound.numel() else 0.0,
                 "used": float(used.max()) if used.numel() else 0.0}
        self.worst[name] = entry
        ok = bool((diff <= bound).all())
        if not ok:
            self.failed.append(f"{name}: max_abs {entry['max_abs']:.3g} exceeds its bound "
                               f"({entry['used']:.3g} x the allowance)")
        return ok

    def equal(self, name: str, ours: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> bool:
        """Exact equality: integer outputs that no float decision makes (token ids, boxes, kept classes)."""
        return self.labels(name, ours, ref, margin=None, bound=None)

    def labels(self, name: str, ours: Tensor | np.ndarray, ref: Tensor | np.ndarray,
               margin: Tensor | np.ndarray | None, bound: float | Tensor | np.ndarray | None) -> bool:
        """A label map decided by float scores: pixels may differ only where ``margin`` (per pixel, from the
        float64 run where there is one) is at most ``bound`` (the allowance of the scores it decides on).
        With ``margin`` None every element must be identical."""
        a, b = _as_double(ours), _as_double(ref)
        if not self._shapes_agree(name, a, b):
            return False
        differ = a != b
        n = int(differ.sum())
        entry = {"max_abs": float((a - b).abs().max()) if a.numel() else 0.0, "bound": 0.0, "used": float(n > 0),
                 "differ": n}
        self.worst[name] = entry
        if n == 0:
            return True
        if margin is None:
            self.failed.append(f"{name}: {n} of {a.numel()} elements differ")
            return False
        m = _as_double(margin).expand_as(a)
        allow = _as_double(bound).expand_as(a)
        near = differ & (m <= allow)
        entry["bound"] = float(allow[differ].max())
        entry["used"] = float((m[differ] / allow[differ].clamp_min(1e-300)).max())
        far = n - int(near.sum())
        if far:
            self.failed.append(f"{name}: {far} of {a.numel()} pixels differ where the decision margin exceeds "
                               f"the scores' bound ({n - far} more within it)")
            return False
        self.allowed[name] = n
        return True

    def measure(self, name: str, ours: Tensor | np.ndarray, ref: Tensor | np.ndarray, as_labels: bool = False
                ) -> None:
        """Record the worst error without judging it (a comparison that is reported, not required).

        With ``as_labels`` the entry's ``differ`` is the fraction of differing elements.
        """
        a, b = _as_double(ours), _as_double(ref)
        diff = (a - b).abs()
        entry = {"max_abs": float(diff.max()), "bound": float("nan"), "used": float("nan")}
        if as_labels:
            entry["differ"] = float((diff > 0).double().mean())
        self.worst[name] = entry

    @property
    def compared(self) -> list[str]:
        return sorted(self.worst)

    def to_json(self) -> dict:
        return {"pass": not self.failed and bool(self.worst), "recorded": len(self.recorded),
                "compared": len(set(self.recorded) & set(self.worst)), "allowed": self.allowed,
                "worst": self.worst, "failed": self.failed}


# fixture kind -> checker(fixture dir, config dict, report)
Checker = Callable[[Path, dict, ParityReport], None]
_CHECKERS: dict[str, Checker] = {}


def register_checker(kind: str) -> Callable[[Checker], Checker]:
    """Decorator: ``kind`` is what :func:`fixture_kind` returns for the fixtures the checker handles."""
    def wrap(fn: Checker) -> Checker:
        _CHECKERS[kind] = fn
        return fn
    return wrap


def fixture_kind(config: dict) -> str:
    """The fixture's ``kind`` when it declares one (``'resnet-backbone'``), else ``'weakclip'`` or
    ``'clip-es'`` from the released repository recorded under ``official`` or ``source``."""
    if config.get("kind"):
        return str(config["kind"])
    origin = config.get("official") or config.get("source") or {}
    if isinstance(origin, dict) and origin.get("kind"):
        return str(origin["kind"])
    repo = str(origin.get("repo", "")).lower() if isinstance(origin, dict) else ""
    if "weakclip" in repo:
        return "weakclip"
    if "clip-es" in repo:
        return "clip-es"
    raise WeakclipError(f"unknown parity fixture: no 'kind' and its released repository is {repo!r}")


def recorded_tensors(fixture: Path) -> list[str]:
    """Names of every tensor in the fixture's ``outputs.safetensors``."""
    with safe_open(str(fixture / "outputs.safetensors"), "pt") as f:
        return sorted(f.keys())


def check_fixture(fixture: str | Path) -> ParityReport:
    """Run every comparison a fixture folder supports and return the report; a recorded tensor that the
    checker did not compare is a failure."""
    fixture = Path(fixture)
    cfg_path = fixture / "config.json"
    if not cfg_path.is_file():
        raise WeakclipError(f"{cfg_path}: not found (a parity fixture holds config.json and safetensors files)")
    config = json.loads(cfg_path.read_text())
    kind = fixture_kind(config)
    _load_checkers()
    if kind not in _CHECKERS:
        raise WeakclipError(f"{fixture}: no checker for {kind!r} fixtures")
    report = ParityReport(recorded=recorded_tensors(fixture))
    _CHECKERS[kind](fixture, config, report)
    missing = sorted(set(report.recorded) - set(report.worst))
    if missing:
        report.failed.append(f"recorded but not compared: {', '.join(missing)}")
    return report


def _load_checkers() -> None:
    """Import the modules whose checkers register themselves."""
    from . import clip_es, resnet, weakclip  # noqa: F401

"""Run the attacks on one or more recordings, side by side, and collect their findings."""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import ATTACKS
from .base import AttackContext, Finding, NotApplicable
from .transcript import VIEWS, load


@dataclass
class RecordingResult:
    record: str
    model: str
    scheme: str
    steps: list[int]  # the recorded training steps the attacks saw
    findings: dict[str, Finding] = field(default_factory=dict)
    key_lifetime: int = 1  # training steps each weight kept its key in the recorded run
    unfold_convs: bool = False  # convolutions were offloaded unfolded (positions shuffled with the rows)
    view: str = "offloaded"  # what the workers are taken to have seen (transcript.VIEWS)

    @property
    def setting(self) -> str:
        """The scheme, with the options that change what a worker sees."""
        return ", ".join([self.scheme] + (["unfolded"] if self.unfold_convs else [])
                         + ([f"K={self.key_lifetime}"] if self.key_lifetime > 1 else [])
                         + (["anchors inside"] if self.view == "anchors-inside" else []))

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["findings"] = {k: asdict(f) for k, f in self.findings.items()}
        return out


def select(names: Sequence[str] | None) -> list[str]:
    """The attacks to run, in report order; unknown names are refused with the list of known ones."""
    if not names:
        return list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    return [n for n in ATTACKS if n in names]


def run_suite(records: Sequence[Path], out_dir: Path, *, attacks: Sequence[str] | None = None, seed: int = 0,
              test_size: int = 2000, aux_size: int = 600, options: dict[str, Any] | None = None,
              views: Sequence[str] = ("offloaded",), log: Callable[[str], None] = print) -> list[RecordingResult]:
    """Every selected attack on every recording, seen in each of `views`. An attack that fails is
    reported as such, not hidden."""
    names = select(attacks)
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ConfigError(f"unknown view(s) {unknown}; choose from {list(VIEWS)}")
    results = []
    for record, view in ((r, v) for r in records for v in views):
        transcript = load(record, view)
        ctx = AttackContext(transcript, out_dir, seed=seed, test_size=test_size, aux_size=aux_size,
                            options=options)
        result = RecordingResult(str(record), transcript.config["model"], transcript.scheme,
                                 [s.step for s in transcript.steps], key_lifetime=ctx.config.key_lifetime,
                                 unfold_convs=ctx.config.unfold_convs, view=view)
        log(f"{transcript.label}: {len(transcript.steps)} recorded step(s) from {record}")
        for name in names:
            start = time.perf_counter()
            result.findings[name] = _run_one(name, ctx)
            f = result.findings[name]
            log(f"  {name:<11} {f.value:8.4f}  (random guess {f.baseline:.4f})  {f.metric}  "
                f"[{time.perf_counter() - start:.1f} s]")
        results.append(result)
    return results


def _run_one(name: str, ctx: AttackContext) -> Finding:
    module = importlib.import_module(f"{__package__}.{name}")
    try:
        return module.run(ctx)
    except NotApplicable as e:
        return Finding(name, "not applicable", math.nan, math.nan, {"not_applicable": str(e)})
    except (ValueError, RuntimeError, NotImplementedError) as e:
        return Finding(name, "failed", math.nan, math.nan, {"error": f"{type(e).__name__}: {e}"})

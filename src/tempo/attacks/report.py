"""The leakage report: ``report.json`` (everything) and ``report.md`` (tables, plots, examples).

Recordings of the same model sit side by side, one column per scheme, next to the random-guess
baseline, so a reader sees at a glance how far each scheme is from `none` (everything leaks) and
from guessing (nothing leaks).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .base import Finding
from .suite import RecordingResult


def write_report(results: list[RecordingResult], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps([r.as_json() for r in results], indent=2, default=float) + "\n")
    by_model: dict[str, list[RecordingResult]] = defaultdict(list)
    for r in results:
        by_model[r.model].append(r)
    lines = ["# Leakage report", "",
             "Each number is what a curious worker (all workers colluding) recovered from the recorded traffic; "
             "higher means more leaked. `random guess` is the same measure for an attacker who guesses.", ""]
    for model, runs in by_model.items():
        lines += _model_section(model, runs, out_dir)
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _fmt(value: float, finding: Finding | None = None) -> str:
    if finding is not None and "not_applicable" in finding.details:
        return "n/a"
    return "failed" if math.isnan(value) else f"{value:.3f}"


def _model_section(model: str, runs: list[RecordingResult], out_dir: Path) -> list[str]:
    attacks = list(dict.fromkeys(a for r in runs for a in r.findings))
    head = ["attack", "measure", *[f"`{r.setting}`" for r in runs], "random guess"]
    lines = [f"## {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in attacks:
        found = [r.findings[a] for r in runs if a in r.findings]
        first = next((f for f in found if not math.isnan(f.value)), found[0])  # the measure's name and baseline
        cells = [_fmt(r.findings[a].value, r.findings[a]) if a in r.findings else "-" for r in runs]
        lines.append(f"| {a} | {first.metric} | " + " | ".join(cells) + f" | {_fmt(first.baseline, first)} |")
    lines += ["", f"![attacks on {model}]({_bar_chart(model, runs, attacks, out_dir)})", ""]
    for r in runs:
        lines += [f"### {model} / `{r.setting}` ({r.record}, steps {r.steps[0]}-{r.steps[-1]})", ""]
        for a, f in r.findings.items():
            if "not_applicable" in f.details:
                lines.append(f"- **{a}**: n/a — {f.details['not_applicable']}")
            else:
                lines.append(f"- **{a}**: {_fmt(f.value)} — {f.metric}" + (f" — {f.details['error']}"
                                                                              if "error" in f.details else ""))
            lines += [f"  ![{caption}]({path})" for caption, path in f.figures.items()]
        lines.append("")
    return lines


def _bar_chart(model: str, runs: list[RecordingResult], attacks: list[str], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(r.setting, [r.findings[a].value if a in r.findings else math.nan for a in attacks])
              for r in runs]
    series.append(("random guess", [next(r.findings[a].baseline for r in runs if a in r.findings)
                                    for a in attacks]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.6 * len(attacks) + 2, 3.2))
    for i, (label, values) in enumerate(series):
        ax.bar([k + i * width for k in range(len(attacks))], values, width, label=label)
    ax.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(attacks))], attacks)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("recovered (higher = more leaked)")
    ax.set_title(f"leakage suite: {model}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    rel = Path("figures") / f"attacks_{model}.png"
    (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / rel, dpi=110)
    plt.close(fig)
    return str(rel)

"""``tempo attack``: run the leakage suite on recorded runs and write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import reported_errors


def attack(
    records: Annotated[list[Path], typer.Argument(
        help="Folders written by `tempo train --record`; recordings of one model are reported side by side "
             "(record the same run with --scheme none for the everything-leaks reference).")],
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md and figures.")] = Path("leakage"),
    only: Annotated[list[str] | None, typer.Option(help="Run only these attacks (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Fixes the attacker's data, initialisations and fine-tuning.")] = 0,
    test_size: Annotated[int, typer.Option(min=100, help="Test images that score stolen models.")] = 2000,
    aux_size: Annotated[int, typer.Option(
        min=10, help="Labelled public images the attacker owns (to name output classes, match statistics).")] = 600,
    finetune_steps: Annotated[int, typer.Option(min=1, help="Step budget of the fine-tuning attack.")] = 200,
    view: Annotated[list[str] | None, typer.Option(
        help="What the workers saw (repeatable, one report column each): 'offloaded' (every product, as "
             "recorded) or 'anchors-inside' (all but the first and last product: the default configuration).")] = None,
) -> None:
    """Play the curious worker on each recording: how much of the model and inputs can it recover?"""
    with reported_errors():
        from ..attacks.report import write_report
        from ..attacks.suite import run_suite, select

        select(only)  # refuse unknown names before loading anything
        results = run_suite(records, out, attacks=only, seed=seed, test_size=test_size, aux_size=aux_size,
                            options={"finetune_steps": finetune_steps}, views=view or ["offloaded"], log=typer.echo)
        json_path, md_path = write_report(results, out)
        typer.echo(f"report: {md_path} (all numbers: {json_path})")

"""The leakage suite end to end: every attack runs on real recordings and the report shows them side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tempo.attacks import ATTACKS
from tempo.attacks.report import write_report
from tempo.attacks.suite import run_suite
from test_cli import invoke

QUICK = {"finetune_steps": 20}


def test_every_attack_runs_and_the_report_compares_schemes(recorded, tmp_path: Path) -> None:
    records = [recorded("small_cnn", "none"), recorded("small_cnn", "permute")]
    results = run_suite(records, tmp_path, test_size=300, aux_size=200, options=QUICK, log=lambda _: None)
    assert [r.scheme for r in results] == ["none", "permute"]
    for r in results:
        assert list(r.findings) == list(ATTACKS)
        for name, f in r.findings.items():
            assert math.isfinite(f.value) and math.isfinite(f.baseline), f"{r.scheme}/{name}: {f.details}"
    json_path, md_path = write_report(results, tmp_path)
    saved = json.loads(json_path.read_text())
    assert [s["scheme"] for s in saved] == ["none", "permute"]
    table = md_path.read_text()
    assert "| attack | measure | `none` | `permute` | random guess |" in table
    for line in table.splitlines():
        if line.startswith("!["):
            assert (tmp_path / line.split("](")[1].rstrip(")")).is_file()


def test_attack_command_writes_the_report(recorded, tmp_path: Path) -> None:
    r = invoke("attack", str(recorded("small_cnn", "permute")), "--out", str(tmp_path), "--only", "linking",
               "--test-size", "200", "--aux-size", "50")
    assert r.returncode == 0, r.stderr
    assert "linking" in r.stdout and (tmp_path / "report.md").is_file()


def test_an_attack_with_nothing_to_work_on_is_reported_not_applicable(recorded, tmp_path: Path) -> None:
    """A ViT has one convolution: the spatial attacks say so ("n/a" and why), instead of failing or guessing."""
    results = run_suite([recorded("small_vit", "permute")], tmp_path, attacks=["spatial_inputs", "samples"],
                        test_size=200, aux_size=50, log=lambda _: None)
    for f in results[0].findings.values():
        assert math.isnan(f.value) and "convolution" in f.details["not_applicable"]
    _, md_path = write_report(results, tmp_path)
    table = md_path.read_text()
    assert "| spatial_inputs | not applicable | n/a | n/a |" in table
    assert "n/a — no two consecutive convolutions" in table


def test_the_anchors_inside_view_withholds_the_first_and_last_product(recorded, tmp_path: Path) -> None:
    """The default configuration's traffic, cut from an offloaded recording: attacks on the anchors say n/a,
    the model attacks keep the enclave's layers at a fresh init, and the report labels the column."""
    record = recorded("small_cnn", "permute")
    r = invoke("attack", str(record), "--out", str(tmp_path), "--view", "offloaded", "--view", "anchors-inside",
               "--only", "inputs", "--only", "samples", "--only", "linking", "--only", "direct_use",
               "--test-size", "200", "--aux-size", "50")
    assert r.returncode == 0, r.stderr
    offloaded, inside = json.loads((tmp_path / "report.json").read_text())
    assert (offloaded["view"], inside["view"]) == ("offloaded", "anchors-inside")
    for name in ("inputs", "samples"):
        assert math.isfinite(offloaded["findings"][name]["value"])
        assert "not_applicable" in inside["findings"][name]["details"], name
    assert "inside the enclave" in inside["findings"]["inputs"]["details"]["not_applicable"]
    assert set(offloaded["findings"]["linking"]["details"]["layers"]) == {"0", "3", "7", "9"}
    assert set(inside["findings"]["linking"]["details"]["layers"]) == {"3", "7"}
    left = inside["findings"]["direct_use"]["details"]["left_at_fresh_init"]
    assert {"0.weight", "9.weight"} <= set(left)
    assert "`permute, anchors inside`" in (tmp_path / "report.md").read_text()


def test_an_unknown_view_is_refused(recorded, tmp_path: Path) -> None:
    r = invoke("attack", str(recorded("small_cnn", "permute")), "--out", str(tmp_path), "--view", "enclave")
    assert r.returncode != 0 and "unknown view" in r.stderr and "anchors-inside" in r.stderr

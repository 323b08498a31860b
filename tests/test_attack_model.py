"""Attacks 1, 4 and 5 (direct use, alignment, weight recovery) on short recorded runs of small_cnn.

Against the plaintext `none` scheme the worker sees everything, so the attacks must recover (nearly)
everything; against `permute` we only check that the numbers are computed, not what they are.
Units a batch leaves without evidence (dead ReLUs) are matched at random, so alignment is exact only
on units with evidence, and weight cosine is high but below 1 where dead units were shuffled.
"""

from __future__ import annotations

import math

import pytest

from tempo.attacks import alignment, direct_use, recovery, weights
from tempo.attacks.base import AttackContext
from tempo.attacks.transcript import load


def _context(recorded, scheme: str, tmp_path, seed: int = 0) -> AttackContext:
    return AttackContext(load(recorded("small_cnn", scheme)), tmp_path, seed=seed, test_size=500, aux_size=300)


@pytest.fixture(scope="module")
def none_findings(recorded, tmp_path_factory):
    ctx = _context(recorded, "none", tmp_path_factory.mktemp("attack-model"))
    return ctx, {m.NAME: m.run(ctx) for m in (alignment, weights, direct_use)}


def test_alignment_is_exact_on_every_unit_with_evidence(none_findings):
    _, found = none_findings
    f = found["alignment"]
    assert f.details["fraction_correct_with_evidence"] == 1.0
    assert f.value > 0.5 > 50 * f.baseline
    assert all(isinstance(p, dict) for p in f.details["pairs"].values())  # the CNN's links are all modelled


def test_weights_are_recovered(none_findings):
    _, found = none_findings
    layers = found["weights"].details["layers"]
    assert layers["0.weight"]["cosine"] == pytest.approx(1.0) and layers["3.weight"]["cosine"] == pytest.approx(1.0)
    assert found["weights"].value > 0.8
    assert abs(found["weights"].baseline) < 0.1


def test_the_leaked_model_works_like_the_true_one(none_findings):
    ctx, found = none_findings
    f = found["direct_use"]
    assert f.value >= f.details["true_model"] - 0.03
    assert f.value > f.baseline + 0.3
    assert f.details["with_enclave_params"] >= f.details["true_model"] - 0.03
    assert recovery.leaked_model(ctx) is recovery.leaked_model(ctx)  # shared through ctx.cache


def test_same_seed_same_numbers(recorded, none_findings, tmp_path):
    _, found = none_findings
    again = _context(recorded, "none", tmp_path)
    for module in (alignment, weights):
        f = module.run(again)
        assert (f.value, f.baseline) == (found[module.NAME].value, found[module.NAME].baseline)


def test_permute_numbers_are_computed(recorded, tmp_path):
    ctx = _context(recorded, "permute", tmp_path)
    for module in (alignment, weights, direct_use):
        f = module.run(ctx)
        assert math.isfinite(f.value) and math.isfinite(f.baseline)
        low = -1.0 if module is weights else 0.0
        assert low <= f.baseline <= 1.0 and low <= f.value <= 1.0

"""The leakage suite's attacker knows only public things: its own seeds, public data no training step saw,
the architecture, and the workers' view. The ground truth opens only to score."""

from __future__ import annotations

import hashlib
import sys
import types

import pytest
import torch

from tempo.attacks import suite
from tempo.attacks.base import AttackContext, attacker_seed
from tempo.attacks.transcript import TruthAccessError, load, scoring
from tempo.training.data import load_data
from tempo.training.models import build_model


@pytest.fixture(scope="module")
def ctx(recorded, tmp_path_factory) -> AttackContext:
    return AttackContext(load(recorded("small_cnn", "permute")), tmp_path_factory.mktemp("hygiene"), test_size=300,
                         aux_size=100)


def test_the_truth_opens_only_inside_scoring(ctx: AttackContext) -> None:
    step = ctx.transcript.steps[0]
    with pytest.raises(TruthAccessError, match="outside scoring"):
        step.truth  # noqa: B018
    with pytest.raises(TruthAccessError):
        step.key(step.ops[0], "row", 4)
    with scoring():
        assert len(step.truth.inputs) == len(step.ops[0].x)
    with pytest.raises(TruthAccessError):
        step.truth.labels  # noqa: B018 (closed again on leaving)


def test_an_attack_that_reads_the_truth_is_a_bug_not_a_failed_attack(ctx: AttackContext, monkeypatch) -> None:
    """The suite reports an attack's ValueError/RuntimeError as "failed"; a peek at the truth must not hide there."""
    peek = types.ModuleType("tempo.attacks.peek")
    peek.run = lambda c: c.transcript.steps[0].truth.params  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tempo.attacks.peek", peek)
    with pytest.raises(TruthAccessError):
        suite._run_one("peek", ctx)


def test_every_attack_runs_without_reading_the_truth_on_a_vit(recorded, tmp_path) -> None:
    """Every attack end to end with the truth closed (a peek raises instead of being reported): the ViT's
    paths (attention heads in the alignment, tokens in gram) on top of the CNN's, which the suite test covers."""
    results = suite.run_suite([recorded("small_vit", "permute")], tmp_path, test_size=300, aux_size=100,
                              options={"finetune_steps": 5}, log=lambda _: None)
    failed = {name: f.details for name, f in results[0].findings.items() if f.metric == "failed"}
    assert not failed


def test_the_attackers_fresh_models_are_not_the_runs_initial_weights(ctx: AttackContext) -> None:
    run_seed = ctx.config.seed
    assert all(attacker_seed(s) != s for s in range(1000))
    torch.manual_seed(run_seed)
    d = ctx.data
    initial = build_model(ctx.config.model, num_classes=d.num_classes, channels=d.channels, image_size=d.image_size)
    mine = ctx.new_model()
    for (name, a), (_, b) in zip(initial.named_parameters(), mine.named_parameters(), strict=True):
        if a.dim() > 1:  # weights (norm scales start at 1 for everybody)
            cosine = torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0)
            assert abs(float(cosine)) < 0.3, name


def _hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in images}


def test_public_data_holds_no_training_image_and_no_scoring_image(ctx: AttackContext) -> None:
    c = ctx.config
    run = load_data(c.dataset, model=c.model, seed=c.seed, train_subset=c.train_subset, test_subset=1,
                    normalize=False)
    trained = _hashes(run.train.images)
    public, scored = _hashes(ctx.data.public.images), _hashes(ctx.data.scoring.images)
    assert len(public) >= ctx.aux_size and len(scored) == ctx.test_size
    assert not public & trained and not scored & trained and not public & scored
    assert ctx.data.training_set_size == len(run.train)

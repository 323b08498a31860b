"""The data-side attacks: linking units across steps, recovering inputs, fine-tuning from the leak."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from tempo.attacks import inputs, linking
from tempo.attacks.base import AttackContext
from tempo.attacks.transcript import OpTruth, OpView, Step, StepTruth, Transcript, load, scoring


def context(folder: Path, out: Path, **options) -> AttackContext:
    return AttackContext(load(folder), out, test_size=500, options=options)


def test_linking_against_none_links_every_unit(recorded, tmp_path):
    finding = linking.run(context(recorded("small_cnn", "none"), tmp_path))
    assert finding.value == pytest.approx(1.0)
    assert 0 < finding.baseline < 0.05
    first = finding.details["layers"]["0"]
    assert first["inner"]["pairs"] == 0  # one input channel: trivially linked, left out of the pool
    assert first["out"]["accuracy"] == pytest.approx(1.0)


def test_inputs_against_none_are_recovered_exactly(recorded, tmp_path):
    finding = inputs.run(context(recorded("small_cnn", "none"), tmp_path))
    assert finding.value == pytest.approx(1.0, abs=1e-6)
    assert finding.details["psnr_db"] >= 100
    assert finding.baseline < 0.5
    assert finding.details["images"] == 3 * 64
    (figure,) = finding.figures.values()
    assert (tmp_path / figure).is_file() and "none" in figure


def _linear_first_op(step: Step, seed: int) -> Step:
    """`step`'s true inputs as a linear first op on flattened pixels would see them under permute."""
    with scoring():
        x, labels = step.truth.inputs, step.truth.labels
    generator = torch.Generator().manual_seed(seed)
    row, inner = torch.randperm(len(x), generator=generator), torch.randperm(x[0].numel(), generator=generator)
    op = OpView(0, 1, "linear", {}, x.flatten(1)[row][:, inner], torch.zeros(10, x[0].numel()), torch.zeros(len(x), 10))
    truth = StepTruth({}, x, labels, {1: OpTruth("fc", "linear", {"row": row, "inner": inner})})
    return Step(step.step, [op], truth)


def test_inputs_undo_a_pixel_permutation(recorded, tmp_path):
    real = load(recorded("small_cnn", "none"))
    constructed = Transcript(real.directory, dict(real.config, scheme="permute"), [_linear_first_op(real.steps[0], 1)])
    finding = inputs.run(AttackContext(constructed, tmp_path, test_size=500))
    assert finding.details["first_op"] == "linear"
    assert finding.value > finding.baseline + 0.2
    assert finding.details["psnr_db"] > finding.details["baseline_psnr_db"]


def test_inputs_undo_a_channel_permutation():
    generator = torch.Generator().manual_seed(0)
    shift = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)
    aux = torch.randn(200, 3, 8, 8, generator=generator) * (1 + shift) + shift
    plain = torch.randn(64, 3, 8, 8, generator=generator) * (1 + shift) + shift
    key = torch.tensor([2, 0, 1])
    op = OpView(0, 1, "conv2d", {}, plain[:, key], torch.zeros(4, 3, 3, 3), torch.zeros(64, 4, 6, 6))
    assert torch.equal(inputs.recover(op, aux), plain)


def _truth_model(ctx: AttackContext) -> nn.Module:
    """Stand-in for recovery.leaked_model: the true weights, the most a leak can give."""
    model = ctx.new_model()
    with scoring():
        model.load_state_dict(ctx.transcript.steps[-1].truth.params)
    return model


@pytest.fixture
def finetune(monkeypatch):
    """The finetune attack with the leak replaced by the truth stand-in (recovery is written elsewhere)."""
    if importlib.util.find_spec("tempo.attacks.recovery") is None:
        monkeypatch.setitem(sys.modules, "tempo.attacks.recovery", types.ModuleType("tempo.attacks.recovery"))
    from tempo.attacks import finetune

    monkeypatch.setattr(finetune.recovery, "leaked_model", _truth_model, raising=False)
    return finetune


def test_finetune_from_the_true_weights_beats_scratch(finetune, recorded, tmp_path):
    ctx = context(recorded("small_cnn", "none"), tmp_path, finetune_steps=10)
    finding = finetune.run(ctx)
    assert finding.baseline == 0.0
    assert finding.value > 0.05
    assert set(finding.details["fractions"]) == {"1%", "5%", "10%"}
    again = finetune.run(context(recorded("small_cnn", "none"), tmp_path, finetune_steps=10))
    assert again.details == finding.details


def test_linking_and_inputs_are_reproducible(recorded, tmp_path):
    folder = recorded("small_cnn", "permute")
    for attack in (linking, inputs):
        assert attack.run(context(folder, tmp_path)).details == attack.run(context(folder, tmp_path)).details


def test_permute_numbers_are_finite_and_in_range(finetune, recorded, tmp_path):
    ctx = context(recorded("small_cnn", "permute"), tmp_path, finetune_steps=2)
    link, recovered, tuned = linking.run(ctx), inputs.run(ctx), finetune.run(ctx)
    assert 0 <= link.value <= 1 and 0 < link.baseline < 1
    assert -1 <= recovered.baseline <= recovered.value <= 1 and math.isfinite(recovered.details["psnr_db"])
    assert -1 <= tuned.value <= 1


def test_ica_separates_independent_features_mixed_by_a_mix_key():
    """The attack `mix` must face: one key M shared by thousands of rows of independent non-Gaussian features."""
    import warnings

    from tempo.attacks.separation import _random_orthogonal, fastica, recovered, whiten
    from tempo.enclave.keys import KeyStream
    from tempo.schemes.mix import AxisMix

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8000, 24, dtype=torch.float64, generator=generator).relu()  # like post-ReLU channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded key stream warns
        key = AxisMix(24, 1, torch.zeros(1, dtype=torch.long), KeyStream(5))
    mixed = key.apply(features, 1, inverse=False, transpose=False)
    z = whiten(mixed)
    assert recovered(mixed, features)[0] == 0.0  # the mixed features themselves match no true one
    assert recovered(z @ _random_orthogonal(24, generator).T, features)[0] == 0.0
    assert recovered(z @ fastica(z, generator).T, features)[0] == 1.0


def test_separation_against_permute_finds_the_features_as_they_are(recorded, tmp_path):
    from tempo.attacks import separation

    finding = separation.run(context(recorded("small_cnn", "permute"), tmp_path))
    assert finding.details["method"] == "as sent"
    assert finding.value >= 0.9 and finding.baseline < 0.2
    assert all(0 <= op["ica"] <= 1 and op["features"] >= 2 for op in finding.details["ops"].values())


def test_samples_are_followed_from_one_convolution_to_the_next(recorded, tmp_path):
    from tempo.attacks import samples

    finding = samples.run(context(recorded("small_cnn", "permute"), tmp_path))
    assert finding.value >= 0.5 and finding.baseline == pytest.approx(1 / 64)  # 0.8 after 40 steps, 1.0 after 200
    assert list(finding.details["pairs"]) == ["0 -> 3"]


def test_inputs_are_rebuilt_from_the_second_convolution(recorded, tmp_path):
    """Even with the first product in the enclave, the second convolution's energy maps keep the images' layout."""
    from tempo.attacks import spatial_inputs

    finding = spatial_inputs.run(context(recorded("small_cnn", "permute"), tmp_path))
    assert finding.value > finding.baseline + 0.05
    (figure,) = finding.figures.values()
    assert (tmp_path / figure).is_file() and figure.startswith("figures/spatial_inputs_")


def test_gram_links_samples_across_a_relu_and_a_flatten(recorded, tmp_path):
    from tempo.attacks import gram

    finding = gram.run(context(recorded("small_cnn", "none"), tmp_path))
    assert finding.value >= 0.5 and finding.baseline == pytest.approx(1 / 64)
    assert set(finding.details["pairs"]) == {"0 -> 3", "3 -> 7", "7 -> 9"}


def _mix_key(n: int, seed: int):
    import warnings

    from tempo.enclave.keys import KeyStream
    from tempo.schemes.mix import AxisMix

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded key stream warns
        return AxisMix(n, 1, torch.zeros(1, dtype=torch.long), KeyStream(seed))


@pytest.mark.parametrize("rank", [4, 64])
def test_a_mix_key_hides_the_rows_gram_matrix_only_when_many_directions_matter(rank):
    """Calibration of `gram` against `mix` itself: rows of ReLU features, then the next op's input under a
    fresh row permutation and a fresh dense key on 256 columns. With a few dominant directions (as in real
    activations) the rows' angles survive the key and the rows link; with 64 equal ones the key bends
    them past recognition, although the same rows link perfectly unkeyed."""
    from tempo.attacks import gram

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, rank, dtype=torch.float64, generator=generator) @ torch.randn(
        rank, 256, dtype=torch.float64, generator=generator) / rank ** 0.5 + 1
    rows = torch.randperm(200, generator=generator)
    out = _mix_key(256, 1).apply(features, 1, inverse=False, transpose=False)
    nxt = _mix_key(256, 2).apply(features.relu()[rows], 1, inverse=False, transpose=False)

    def linked(match: torch.Tensor) -> float:
        return float((rows[match] == torch.arange(200)).double().mean())  # chance: 0.005

    assert linked(gram.link(features, features.relu()[rows])) >= 0.9
    assert linked(gram.link(out, nxt)) >= 0.8 if rank == 4 else linked(gram.link(out, nxt)) <= 0.05


@pytest.mark.parametrize("reused", [True, False])
def test_linking_follows_mixed_units_only_while_the_key_is_reused(reused):
    """Calibration of `linking` on a weakened `mix`: with the same key on both steps, W' drifts as slowly as
    W and the units link; with a fresh key per step (the real `mix`) they link at chance."""
    from tempo.attacks.linking import link, signatures

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64, generator=generator)
    after = w + 1e-3 * torch.randn(48, 64, dtype=torch.float64, generator=generator)  # one optimizer step

    def blind(weight: torch.Tensor, seed: int) -> torch.Tensor:  # a dense key on each axis of [OUT, INNER]
        out, inner = _mix_key(48, seed), _mix_key(64, seed + 100)
        return inner.apply(out.apply(weight, 0, inverse=False, transpose=False), 1, inverse=True, transpose=True)

    before_blind, after_blind = blind(w, 1), blind(after, 1 if reused else 2)
    match, _ = link(signatures(before_blind, 0), signatures(after_blind, 0))
    linked = float((torch.as_tensor(match) == torch.arange(48)).double().mean())
    assert linked == 1.0 if reused else linked <= 0.1


def test_gram_units_links_a_vits_mlp_units_under_permute_not_under_a_mix_key(recorded, tmp_path):
    """Calibration of `gram_units`: fc1 -> GELU -> fc2 passes units one to one; their correlations match."""
    from tempo.attacks import gram_units

    finding = gram_units.run(context(recorded("small_vit", "permute"), tmp_path))
    assert finding.value >= 0.5 and "mlp.fc1 -> " in finding.details["best_pair"]
    assert finding.baseline == pytest.approx(1 / 128)

    generator = torch.Generator().manual_seed(0)
    units = torch.randn(3, 4000, dtype=torch.float64, generator=generator)
    hidden = torch.randn(40, 3, dtype=torch.float64, generator=generator) @ units  # 40 correlated units
    permuted = torch.randperm(40, generator=generator)
    mixed = _mix_key(40, 3).apply(hidden.T, 1, inverse=False, transpose=False).T
    unmixed_match = gram_units.match_graphs(gram_units.correlations(hidden), gram_units.correlations(hidden[permuted]))
    assert float((permuted[unmixed_match] == torch.arange(40)).double().mean()) == 1.0
    dominant = _mix_key(40, 3).dense().abs().argmax(0)  # blinded unit i is mostly plain unit dominant[i]
    mixed_match = gram_units.match_graphs(gram_units.correlations(hidden), gram_units.correlations(mixed))
    assert float((dominant[mixed_match] == torch.arange(40)).double().mean()) <= 0.15

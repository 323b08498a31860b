"""Key lifetime K > 1: resident blinded weights, updated by their workers, train exactly like plaintext."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tempo
from tempo.enclave.pools import InProcessPool
from tempo.errors import ConfigError, IntegrityError
from tempo.schemes import Operand, Permute
from tempo.testing.recording import RecordingPool
from tempo.wire.messages import ForwardJob, Install, Result, Update
from tempo.worker.core import WorkerCore

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}
WEIGHTS = 3  # offloaded weights of _net(): two convolutions (one grouped) and a linear layer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


class Run:
    """One training run of _net(), plaintext (pool None) or protected with key lifetime K."""

    def __init__(self, optimizer: str, pool=None, *, key_lifetime: int = 1, schedule: bool = False):
        self.module = _net()
        if pool is None:
            self.net = self.module
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.net = tempo.protect(self.module, pool, scheme="permute", key_lifetime=key_lifetime, key_seed=5,
                                          offload_anchors=True)
        self.opt = OPTIMIZERS[optimizer](self.module.parameters())
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=30) if schedule else None
        self.losses: list[float] = []

    def train(self, steps: range, *, micro_batches: int = 1, before_step: Callable | None = None) -> Run:
        for i in steps:
            self.opt.zero_grad()
            for j in range(micro_batches):
                x, y = _batch(i * micro_batches + j)
                loss = F.cross_entropy(self.net(x), y)
                loss.backward()
                self.losses.append(loss.item())
            if before_step is not None:
                before_step(i, self.module)
            self.opt.step()
            if self.schedule is not None:
                self.schedule.step()
        return self


def _assert_same_training(run: Run, plain: Run) -> None:
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(run.module.state_dict().items(), plain.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _assert_workers_hold_blinded_enclave_weights(run: Run, pool: InProcessPool) -> None:
    """Each worker's W' is bit for bit the enclave's current W under the held key."""
    engine = run.net.engine
    residents = [r for r in engine.residency._weights.values() if r.installed_step >= 0]
    assert len(residents) == WEIGHTS
    for r in residents:
        held = pool.cores[r.worker].resident_weight(r.weight_id)
        assert torch.equal(held, engine.scheme.blind(r.param.detach(), r.layout, Operand.W, r.key)), r.name


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("key_lifetime", [1, 10, 100])
def test_training_matches_plaintext(optimizer: str, key_lifetime: int) -> None:
    steps = range(105)  # K = 100 re-keys once
    plain = Run(optimizer).train(steps)
    pool = RecordingPool(InProcessPool(2))
    run = Run(optimizer, pool, key_lifetime=key_lifetime).train(steps)
    _assert_same_training(run, plain)
    installs = pool.jobs.count("Install")
    weights_sent = sum(field == "w" for field, _ in pool.received)
    if key_lifetime == 1:
        # every forward (each row shard of every weight's op, each step) carries its own fresh W'
        assert installs == 0 and "Update" not in pool.jobs and weights_sent == pool.jobs.count("ForwardJob")
        assert weights_sent >= WEIGHTS * len(steps)
    else:
        assert installs == weights_sent == WEIGHTS * math.ceil(len(steps) / key_lifetime)
        assert pool.jobs.count("Update") == 2 * len(steps)  # one per home worker and step
        _assert_workers_hold_blinded_enclave_weights(run, pool.inner)


def test_clipping_and_a_schedule_send_only_a_scale() -> None:
    """Global-norm clipping scales every gradient by one number: the worker gets that number, not dW."""
    norms: list[float] = []

    def clip(_: int, module: nn.Module) -> None:
        norms.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm=0.5)))

    plain = Run("sgd", schedule=True).train(range(25), before_step=clip)
    assert sum(n > 0.5 for n in norms) >= 5  # the clip was active on several steps
    pool = RecordingPool(InProcessPool(2))
    run = Run("sgd", pool, key_lifetime=10, schedule=True).train(range(25), before_step=clip)
    _assert_same_training(run, plain)
    assert not [name for name, _ in pool.received if name.startswith("grad/")]
    _assert_workers_hold_blinded_enclave_weights(run, pool.inner)


def test_any_other_gradient_change_sends_the_blinded_gradient() -> None:
    def perturb(i: int, module: nn.Module) -> None:
        g = torch.Generator().manual_seed(100 + i)
        for p in module.parameters():
            p.grad.add_(torch.randn(p.shape, generator=g), alpha=1e-3)

    plain = Run("adamw").train(range(12), before_step=perturb)
    pool = RecordingPool(InProcessPool(2))
    run = Run("adamw", pool, key_lifetime=5).train(range(12), before_step=perturb)
    _assert_same_training(run, plain)
    assert sum(name.startswith("grad/") for name, _ in pool.received) == WEIGHTS * 12


def test_gradient_accumulation_across_a_key_refresh() -> None:
    """Two micro-batches per step with K = 3 forwards: some refreshes fall between the micro-batches."""
    plain = Run("sgd").train(range(8), micro_batches=2)
    run = Run("sgd", InProcessPool(2), key_lifetime=3).train(range(8), micro_batches=2)
    _assert_same_training(run, plain)


def test_weights_changed_outside_the_optimizer_are_installed_afresh() -> None:
    other = _net().state_dict()
    other = {k: v * 0.5 for k, v in other.items()}
    plain = Run("sgd").train(range(4))
    pool = RecordingPool(InProcessPool(2))
    run = Run("sgd", pool, key_lifetime=50).train(range(4))
    for r in (plain, run):
        r.module.load_state_dict(other)
    plain.train(range(4, 8))
    run.train(range(4, 8))
    _assert_same_training(run, plain)
    assert pool.jobs.count("Install") == 2 * WEIGHTS


def test_a_new_or_reloaded_optimizer_state_reaches_the_workers() -> None:
    """A fresh optimizer (empty momentum) and a reloaded one both replace the workers' optimizer state."""
    plain, run = Run("sgd").train(range(3)), Run("sgd", InProcessPool(2), key_lifetime=50).train(range(3))
    saved = [copy.deepcopy(r.opt.state_dict()) for r in (plain, run)]
    for r in (plain, run):
        r.opt = OPTIMIZERS["sgd"](r.module.parameters())
        r.train(range(3, 6))
    for r, state in zip((plain, run), saved, strict=True):
        r.opt.load_state_dict(state)
        r.train(range(6, 9))
    _assert_same_training(run, plain)


def test_checkpoints_and_evaluation_see_plaintext_weights() -> None:
    plain = Run("adamw").train(range(12))
    pool = RecordingPool(InProcessPool(2))
    run = Run("adamw", pool, key_lifetime=10).train(range(12))
    _assert_same_training(run, plain)  # state_dict() holds plaintext weights
    x, _ = _batch(999)
    sent = len(pool.received)
    with torch.no_grad():
        torch.testing.assert_close(run.net.eval()(x), plain.net.eval()(x), rtol=1e-5, atol=1e-6)
    assert [name for name, _ in pool.received[sent:]] == ["x"] * WEIGHTS  # evaluation used the resident W'


def test_unsupported_optimizers_are_refused_before_any_update() -> None:
    class MySGD(torch.optim.SGD):
        pass

    for make in (lambda p: torch.optim.RMSprop(p, lr=0.01), lambda p: MySGD(p, lr=0.01)):
        run = Run("sgd", InProcessPool(1), key_lifetime=4)
        run.opt = make(run.module.parameters())
        before = copy.deepcopy(run.module.state_dict())
        with pytest.raises(ConfigError, match=r"SGD, Adam, AdamW only .* not .*(RMSprop|MySGD)"):
            run.train(range(1))
        assert all(torch.equal(before[k], v) for k, v in run.module.state_dict().items())


def test_bad_key_lifetimes_and_schemes_are_refused() -> None:
    class Mixing(Permute):
        name = "mixing"
        updates_commute = False

    with tempo.local_workers(1, in_process=True) as pool:
        for bad in (0, -3, 1.5, True):
            with pytest.raises(ConfigError, match="key_lifetime must be an integer >= 1"):
                tempo.protect(_net(), pool, key_lifetime=bad)
        with pytest.raises(ConfigError, match="scheme 'mixing' cannot update blinded weights"):
            tempo.protect(_net(), pool, scheme=Mixing(), key_lifetime=2)


def test_backward_after_the_weight_was_re_keyed_is_refused() -> None:
    """The worker would add this backward's dW' to the new key's sum: refused, not silently wrong."""
    run = Run("sgd", InProcessPool(1), key_lifetime=2)
    x, y = _batch(0)
    loss = F.cross_entropy(run.net(x), y)  # step 1: installs
    for _ in range(2):
        run.net(x)  # steps 2, 3: the third re-keys every weight
    with pytest.raises(ConfigError, match=r"got a new key .* before this forward's backward"):
        loss.backward()


class _CorruptingCore(WorkerCore):
    """Applies every update, then nudges one entry of each resident W'."""

    def _update(self, job: Update) -> None:
        super()._update(job)
        for entry in job.entries:
            self._resident[entry["weight"]].w.view(-1)[0] += 0.1


def test_a_worker_that_corrupts_its_resident_weights_is_caught() -> None:
    run = Run("sgd", InProcessPool(1, cores=[_CorruptingCore()]), key_lifetime=5)
    run.train(range(1))
    with pytest.raises(IntegrityError, match=r"op '0' \(forward\) at step 2 .* resident on the worker"):
        run.train(range(1, 2))


def test_workers_refuse_bad_resident_jobs() -> None:
    core = WorkerCore("cpu")
    assert isinstance(core.handle(Install(1, 7, torch.randn(3, 2))), Result)
    x = torch.randn(4, 2)

    def fails(job, fragment: str) -> None:
        reply = core.handle(job)
        assert not isinstance(reply, Result) and fragment in reply.message, reply

    fails(ForwardJob(2, 1, "linear", {}, x, None, True, True, weight=8), "no resident weight 8")
    fails(ForwardJob(3, 1, "linear", {}, x, torch.randn(3, 2), True, True, weight=7), "not both")
    hyper = {"lr": 0.1}
    fails(Update(4, "SGD", [{"weight": 9, "scale": 1.0, "hyper": hyper}]), "names no installed resident weight")
    fails(Update(5, "SGD", [{"weight": 7, "scale": 1.0, "hyper": hyper, "state": {}}]), "no dW' was computed")
    fails(Update(6, "LBFGS", [{"weight": 7, "scale": None, "hyper": hyper, "state": {}}],
                 {"grad/7": torch.randn(3, 2)}), "unsupported optimizer 'LBFGS'")
    fails(Update(7, "SGD", [{"weight": 7, "scale": None, "hyper": hyper, "state": {}}],
                 {"grad/7": torch.randn(2, 3)}), "gradient is torch.float32 [2, 3]")
    fails(Update(8, "SGD", [{"weight": 7, "scale": None, "hyper": {"lr": 0.1, "rm": 1}, "state": {}}],
                 {"grad/7": torch.randn(3, 2)}), "bad SGD arguments")
    fails(Update(9, "SGD", [{"weight": 7, "scale": float("nan"), "hyper": hyper}]), "finite number")
    w = core.resident_weight(7).clone()
    ok = core.handle(Update(10, "SGD", [{"weight": 7, "scale": None, "hyper": hyper, "state": {}}],
                            {"grad/7": torch.ones(3, 2)}))
    assert isinstance(ok, Result) and torch.allclose(core.resident_weight(7), w - 0.1)

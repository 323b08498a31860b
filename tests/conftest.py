"""Shared fixtures: in-process workers and plaintext-vs-protected comparison helpers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tempo
from tolerance import assert_as_exact_as_float32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def workers():
    with tempo.local_workers(2, in_process=True) as pool:
        yield pool


def protect_quietly(model: nn.Module, pool, **kwargs) -> tempo.ProtectedModel:
    """protect() without the loud warnings the insecure 'none' scheme and seeded keys give.

    Offloads every product, anchors included, unless told otherwise: most tests are about offloading.
    """
    kwargs.setdefault("offload_anchors", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tempo.protect(model, pool, key_seed=kwargs.pop("key_seed", 1234), **kwargs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Close relative to the tensor's scale: for float64, whose rounding no kernel choice brings near `rtol`."""
    scale = expected.abs().max().clamp_min(1e-6)  # all-zero gradients: absolute floor
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol} x scale {scale:.3g}"


class Call(nn.Module):
    """A module that applies `fn` to its inputs and its parameters, for testing functional ops."""

    def __init__(self, fn, *params: torch.Tensor):
        super().__init__()
        self.fn = fn
        self.params = nn.ParameterList([nn.Parameter(p) for p in params])

    def forward(self, *inputs):
        return self.fn(*inputs, *self.params)


def compare_with_plain(module: nn.Module, inputs: list[torch.Tensor], pool, *, scheme: str = "permute",
                       rtol: float = 1e-5, checks: int = 2, **options) -> tempo.ProtectedModel:
    """Forward and backward through `module` protected and plain; outputs and all grads must agree.

    float64: within `rtol` of each tensor's scale. float32: judged against the same computation in float64
    by plain float32's own error (tests/tolerance.py), so that the CPU's kernels cannot decide the verdict.
    """
    dtype = inputs[0].dtype
    plain = _forward_backward(copy.deepcopy(module), inputs, dtype)
    exact = _forward_backward(copy.deepcopy(module).double(), inputs, torch.float64) if dtype == torch.float32 else None
    protected = protect_quietly(module, pool, scheme=scheme, checks=checks, **options)
    got = _forward_backward(module, inputs, dtype, net=protected)
    assert got.keys() == plain.keys()
    for what, value in got.items():
        assert value.shape == plain[what].shape, f"{what}: shape {tuple(value.shape)}, plain {tuple(plain[what].shape)}"
        if exact is None:
            assert_close(value, plain[what], rtol, what)
        else:
            assert_as_exact_as_float32(value, plain[what], exact[what], what)
    return protected


def _forward_backward(module: nn.Module, inputs: list[torch.Tensor], dtype: torch.dtype,
                      net: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Output, input grads and parameter grads of `module` (run as `net`) on `inputs` cast to `dtype`."""
    ins = [i.detach().to(dtype).requires_grad_(i.requires_grad) for i in inputs]
    torch.manual_seed(1)  # same dropout masks in every run
    y = (net or module)(*ins)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(y.dtype))
    out = {"output": y.detach()}
    out |= {f"grad of input {i}": x.grad for i, x in enumerate(ins) if x.requires_grad}
    return out | {f"grad of {name}": p.grad for name, p in module.named_parameters()}


RECORDED_STEPS = 40  # training steps of a recorded test run (batch 64)


@pytest.fixture(scope="session")
def recorded(tmp_path_factory):
    """`recorded(model, scheme)`: the folder of a short recorded training run, made once per session.

    Fashion-MNIST, 40 steps of batch 64, one in-process worker, the last 3 steps recorded.
    """
    from tempo.training.config import TrainConfig
    from tempo.training.loop import train

    made: dict[tuple[str, str], object] = {}

    def make(model: str = "small_cnn", scheme: str = "permute"):
        if (model, scheme) not in made:
            folder = tmp_path_factory.mktemp(f"record-{model}-{scheme}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(TrainConfig(model=model, scheme=scheme, workers=1, in_process_workers=True, epochs=1,
                                  train_subset=64 * RECORDED_STEPS, test_subset=500, batch_size=64, lr=0.05,
                                  record=folder / "record", record_steps=3,
                                  offload_anchors=True, out=folder / "run", progress=False),
                      log=lambda _: None)
            made[model, scheme] = folder / "record"
        return made[model, scheme]

    return make

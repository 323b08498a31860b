"""Every offloaded op, every scheme, against plain PyTorch: outputs and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tempo
from conftest import Call, compare_with_plain, protect_quietly
from tempo.testing import RecordingPool

SCHEMES = ["none", "permute", "mix"]


def rand(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("x_shape", "out", "bias"), [
    ((1, 1), 1, False), ((3, 7), 5, True), ((2, 5, 33), 17, True), ((64, 10), 3, False),
])
def test_linear(workers, scheme, x_shape, out, bias):
    layer = nn.Linear(x_shape[-1], out, bias=bias)
    compare_with_plain(layer, [rand(*x_shape)], workers, scheme=scheme)


def test_linear_non_contiguous_input(workers):
    x = torch.randn(33, 4).T.requires_grad_(True)  # (4, 33), transposed view
    assert not x.is_contiguous()
    compare_with_plain(nn.Linear(33, 6), [x], workers)


CONVS = [
    dict(cin=3, cout=4, k=3, stride=1, padding=1),
    dict(cin=3, cout=5, k=3, stride=2, padding=0, dilation=2),
    dict(cin=4, cout=6, k=3, stride=1, padding=1, groups=2),
    dict(cin=6, cout=6, k=3, stride=1, padding=1, groups=6),  # depthwise
    dict(cin=4, cout=8, k=5, stride=2, padding=2, groups=4),  # depthwise, multiplier 2
    dict(cin=5, cout=7, k=(3, 1), stride=(2, 1), padding=(1, 0)),
    dict(cin=2, cout=3, k=4, padding="same"),  # even kernel: asymmetric padding
    dict(cin=3, cout=3, k=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("batch", [1, 3])
def test_conv2d(workers, scheme, cfg, batch):
    cfg = dict(cfg)
    conv = nn.Conv2d(cfg.pop("cin"), cfg.pop("cout"), cfg.pop("k"), **cfg)
    compare_with_plain(conv, [rand(batch, conv.in_channels, 9, 11)], workers, scheme=scheme)


@pytest.mark.parametrize("scheme", ["permute", "mix"])
@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_unfolded(scheme, cfg):
    """unfold_convs: the same results, from a batched product whose rows are samples and positions."""
    cfg = dict(cfg)
    conv = nn.Conv2d(cfg.pop("cin"), cfg.pop("cout"), cfg.pop("k"), **cfg)
    pool = RecordingPool(tempo.local_workers(1, in_process=True))
    compare_with_plain(conv, [rand(2, conv.in_channels, 9, 11)], pool, scheme=scheme, unfold_convs=True)
    x_sent = next(t for field, t in pool.received if field == "x")
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    assert x_sent.dim() == 3 and x_sent.shape[0] == conv.groups  # [groups, samples x positions, patch]
    assert x_sent.shape[2] == kernel * conv.in_channels // conv.groups


def test_conv2d_channels_last_and_unbatched(workers):
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last).requires_grad_(True)
    compare_with_plain(conv, [x], workers)
    compare_with_plain(nn.Conv2d(3, 5, 3), [rand(3, 7, 7)], workers)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4), groups=st.sampled_from([1, 2, 3]), cin_per=st.integers(1, 3),
    cout_per=st.integers(1, 3), k=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2),
    dilation=st.integers(1, 2), size=st.integers(5, 10),
)
def test_conv2d_random_configs(batch, groups, cin_per, cout_per, k, stride, padding, dilation, size):
    if dilation * (k - 1) + 1 > size + 2 * padding:
        return  # no output positions: an invalid config for plain PyTorch too
    conv = nn.Conv2d(groups * cin_per, groups * cout_per, k, stride=stride, padding=padding,
                     dilation=dilation, groups=groups)
    with tempo.local_workers(1, in_process=True) as pool:
        compare_with_plain(conv, [rand(batch, groups * cin_per, size, size)], pool)


MATMULS = [
    ((5, 7), (7, 3)), ((2, 3, 5, 7), (2, 3, 7, 4)), ((3, 5, 7), (7, 4)), ((5, 7), (2, 7, 4)),
    ((7,), (7, 4)), ((3, 5, 7), (7,)), ((1, 1), (1, 1)), ((2, 1, 5, 7), (3, 7, 2)),
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("a", "b"), MATMULS)
def test_matmul_activation_x_activation(workers, scheme, a, b):
    compare_with_plain(Call(torch.matmul), [rand(*a), rand(*b)], workers, scheme=scheme)


@pytest.mark.parametrize("fn", [
    lambda a, b: a @ b, lambda a, b: torch.bmm(a, b), lambda a, b: a.bmm(b),
    lambda a, b: torch.baddbmm(torch.ones(1, dtype=a.dtype), a, b, alpha=0.5),
])
def test_matmul_spellings(workers, fn):
    compare_with_plain(Call(fn), [rand(3, 4, 5), rand(3, 5, 2)], workers)


def test_mm_and_addmm(workers):
    compare_with_plain(Call(lambda a, b: torch.mm(a, b)), [rand(4, 5), rand(5, 3)], workers)
    compare_with_plain(Call(lambda a, w, c: torch.addmm(c, a, w, beta=2.0), torch.randn(5, 3), torch.randn(3)),
                       [rand(4, 5)], workers)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kwargs", [
    {}, {"is_causal": True}, {"scale": 0.3},
    {"attn_mask": torch.rand(5, 6) > 0.3}, {"attn_mask": torch.randn(5, 6)},
])
def test_scaled_dot_product_attention(workers, scheme, kwargs):
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 6, 8), rand(2, 3, 6, 4)
    if kwargs.get("is_causal"):
        k, v = rand(2, 3, 5, 8), rand(2, 3, 5, 4)
    if "attn_mask" in kwargs:
        kwargs["attn_mask"][:, 0] = True if kwargs["attn_mask"].dtype == torch.bool else 0.0  # no empty rows
    fn = Call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs))
    compare_with_plain(fn, [q, k, v], workers, scheme=scheme)


class SelfAttention(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.mha, self.need_weights = nn.MultiheadAttention(16, 4, batch_first=True), need_weights

    def forward(self, x):
        return self.mha(x, x, x, need_weights=self.need_weights)[0]


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_module(workers, need_weights):
    protected = compare_with_plain(SelfAttention(need_weights), [rand(2, 5, 16)], workers)
    assert protected.engine.stats.products["forward"] == 4  # in-projection, QK^T, PV, out-projection


def test_gradcheck_double(workers):
    """Analytical gradients through the offload equal numerical ones, in double precision."""
    for module, shape in [(nn.Linear(4, 3), (2, 4)), (nn.Conv2d(2, 4, 3, padding=1, groups=2), (1, 2, 4, 4))]:
        protected = protect_quietly(module.double(), workers)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, p=protected: p(x), (x,))
    protected = protect_quietly(Call(torch.matmul), workers)
    a, b = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(protected, (a, b))


def test_every_product_is_offloaded(workers):
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    protected = protect_quietly(conv, workers)
    protected(rand(2, 3, 7, 7, grad=False)).sum().backward()
    # the convolution's rows (294 values, 108 weights) in two shards, one per worker; the linear's (200 values,
    # 200 weights) whole; the first layer's dX is not needed
    assert protected.engine.stats.products == {"forward": 3, "grad_weight": 3, "grad_input": 1}

"""Per-step overhead of Tempo against plain PyTorch, measured side by side in one run.

For each model (default: torchvision resnet18 on 1x28x28, timm vit_tiny_patch16_224 on 3x32x32)
three copies of the same initial model train on the same synthetic batches with SGD + momentum:

* ``plain``   ordinary PyTorch on ``--device`` (the workers' device; CPU here);
* ``tempo``   the model protected with ``scheme="permute", checks=2`` on one in-process worker
              (on ``--device``); the enclave itself runs on CPU;
* ``enclave`` ordinary PyTorch on CPU: the whole step inside the enclave process (on a CPU-only
              machine the same computation as ``plain``, measured as its own row all the same).

Steps are interleaved in rounds (one step of each per round, the order rotating from round to
round) and medians are taken after warm-up rounds, so that machine noise hits all three alike.

Reported ratios:

(a) tempo step time / plain step time;
(b) enclave-side time of a tempo step (wall time minus time spent inside worker calls, which with
    in-process workers is the workers' compute) / enclave-mode step time;
(c) bytes sent to workers per tempo step / lower bound, and bytes received / lower bound. The
    lower bounds are computed independently of Tempo, from the operand shapes of every product a
    plain step computes (recorded with a TorchFunctionMode): each offloaded product sends X, W
    and dY once (dY only when a gradient is needed) and receives Y, dX (when X needs a gradient)
    and dW (when W needs a gradient) once. Biases are not counted (they stay in the enclave).
    Attention (``F.scaled_dot_product_attention``) is counted as the two products Tempo must
    offload once softmax runs in the enclave: Q·Kᵀ (sends Q, K, dS; receives S, dQ, dK) and P·V
    (sends P, V, dO; receives O, dP, dV), S and P being the [L, S] score / probability matrices.

``--profile [STEPS]`` then breaks the enclave-side time of a few more tempo steps down into key
generation, blinding, unblinding, Freivalds checks and everything else (the model's own
non-product ops, autograd, optimizer, interception), twice: with wall-clock timers around the
engine's calls (accurate totals) and under cProfile (inflated, but with the direct callees of the
checks and gathers). It also splits one enclave-mode step (torch.profiler) into product kernels
and everything else: the latter stays in the enclave under Tempo, so its share floors ratio (b).

On a small shared machine, ``--threads 1`` gives far steadier numbers: with more OpenMP threads
than free cores, every parallel op can stall at its barrier, which hurts Tempo's many small ops
much more than plain PyTorch's few large ones.

Usage::

    python benchmarks/step_overhead.py                      # both models, default steps
    python benchmarks/step_overhead.py --models resnet18 --steps 20 --json out.json --profile
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import math
import os
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import tempo
from tempo.training.models import build_model

# name -> (build_model name, channels, image size)
MODELS: dict[str, tuple[str, int, int]] = {
    "resnet18": ("resnet18", 1, 28),
    "vit_tiny": ("timm:vit_tiny_patch16_224", 3, 32),
}
NUM_CLASSES = 10
TARGET_STEP_RATIO = 1.5  # (a)
TARGET_ENCLAVE_RATIO = {"resnet18": 0.25}  # (b)


# -- lower bound on traffic: the products of a plain step -----------------------------------------
@dataclass
class ProductRecord:
    """One offloaded product's operands (sent) and results (received), in bytes."""

    func: str
    sent: dict[str, int]
    received: dict[str, int]


def _nbytes(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _matmul_record(name: str, a: Tensor, b: Tensor) -> ProductRecord:
    """X = a, W = b, as torch.matmul broadcasts them (1-D operands promoted)."""
    a_shape = (1, *a.shape) if a.dim() == 1 else tuple(a.shape)
    b_shape = (*b.shape, 1) if b.dim() == 1 else tuple(b.shape)
    batch = torch.broadcast_shapes(a_shape[:-2], b_shape[:-2]) if len(b_shape) > 2 else a_shape[:-2]
    y_shape = (*batch, a_shape[-2], b_shape[-1])
    return _record(name, a, a_shape, b, b_shape, y_shape)


def _record(name: str, x: Tensor, x_shape, w: Tensor, w_shape, y_shape, *, labels=("X", "W", "Y", "dY", "dX", "dW"),
            x_grad: bool | None = None, w_grad: bool | None = None) -> ProductRecord:
    lx, lw, ly, ldy, ldx, ldw = labels
    dt = x.dtype
    x_grad = x.requires_grad if x_grad is None else x_grad
    w_grad = w.requires_grad if w_grad is None else w_grad
    grad = torch.is_grad_enabled() and (x_grad or w_grad)
    sent = {lx: _nbytes(x_shape, dt), lw: _nbytes(w_shape, dt)}
    received = {ly: _nbytes(y_shape, dt)}
    if grad:
        sent[ldy] = _nbytes(y_shape, dt)
        if x_grad:
            received[ldx] = _nbytes(x_shape, dt)
        if w_grad:
            received[ldw] = _nbytes(w_shape, dt)
    return ProductRecord(name, sent, received)


class ProductRecorder(TorchFunctionMode):
    """Records the operand shapes of every product a model computes (nothing is changed)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[ProductRecord] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self._describe(func, args, kwargs, out)
        self.records.extend(rec)
        return out

    def _describe(self, func, args, kwargs, out) -> list[ProductRecord]:
        if func is F.linear:
            x, w = args[0], args[1]
            rows = math.prod(x.shape[:-1])
            return [_record("linear", x, (rows, x.shape[-1]), w, tuple(w.shape), (rows, w.shape[0]))]
        if func is F.conv2d:
            x, w = args[0], args[1]
            return [_record("conv2d", x, tuple(x.shape), w, tuple(w.shape), tuple(out.shape))]
        if func in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm):
            return [_matmul_record(func.__name__, args[0], args[1])]
        if func is Tensor.__rmatmul__:
            return [_matmul_record("rmatmul", args[1], args[0])]
        if func in (torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm):
            return [_matmul_record(func.__name__, args[1], args[2])]
        if func is F.scaled_dot_product_attention:
            q, k, v = (args + (None,) * 3)[:3]
            q = kwargs.get("query", q)
            k = kwargs.get("key", k)
            v = kwargs.get("value", v)
            L, S = q.shape[-2], k.shape[-2]
            batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
            scores = (*batch, L, S)
            kt = (*batch, k.shape[-1], S)
            grad_qk = q.requires_grad or k.requires_grad
            qk = _record("sdpa:Q@K^T", q, (*batch, L, q.shape[-1]), k, kt, scores,
                         labels=("Q", "K", "S", "dS", "dQ", "dK"))
            pv = _record("sdpa:P@V", q, scores, v, (*batch, S, v.shape[-1]), tuple(out.shape),
                         labels=("P", "V", "O", "dO", "dP", "dV"), x_grad=grad_qk, w_grad=v.requires_grad)
            return [qk, pv]
        return []


def traffic_lower_bound(model: nn.Module, x: Tensor, y: Tensor) -> tuple[int, int, list[ProductRecord]]:
    """Bytes sent / received if every product's operands and results crossed once (one step)."""
    model = copy.deepcopy(model).cpu()
    rec = ProductRecorder()
    with rec:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    sent = sum(sum(r.sent.values()) for r in rec.records)
    received = sum(sum(r.received.values()) for r in rec.records)
    return sent, received, rec.records


def describe_records(records: list[ProductRecord]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.func] = counts.get(r.func, 0) + 1
    return ", ".join(f"{n}x {f}" for f, n in counts.items())


# -- the three kinds of step ---------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model copy with its optimizer; `step()` trains one batch and returns its wall time."""

    def __init__(self, model: nn.Module, device: torch.device, batches: list[tuple[Tensor, Tensor]]):
        self.model, self.device = model, device
        self.batches = [(x.to(device), y.to(device)) for x, y in batches]
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.i = 0

    def step(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - t0


@dataclass
class ModelResult:
    model: str
    input: str
    batch_size: int
    steps: int
    warmup: int
    plain_s: list[float] = field(default_factory=list)
    tempo_s: list[float] = field(default_factory=list)
    tempo_worker_s: list[float] = field(default_factory=list)
    tempo_enclave_s: list[float] = field(default_factory=list)
    enclave_mode_s: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    bytes_received: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    lb_sent: int = 0
    lb_received: int = 0
    products: str = ""
    profile: dict = field(default_factory=dict)

    def med(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    def ratios(self) -> dict[str, float]:
        paired_a = [t / p for t, p in zip(self.tempo_s, self.plain_s, strict=True)]
        paired_b = [t / e for t, e in zip(self.tempo_enclave_s, self.enclave_mode_s, strict=True)]
        return {
            "a_step": self.med("tempo_s") / self.med("plain_s"),
            "a_step_paired_median": statistics.median(paired_a),
            "b_enclave": self.med("tempo_enclave_s") / self.med("enclave_mode_s"),
            "b_enclave_paired_median": statistics.median(paired_b),
            "c_sent": self.med("bytes_sent") / self.lb_sent,
            "c_received": self.med("bytes_received") / self.lb_received,
        }


def make_batches(batch_size: int, channels: int, size: int, n: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, channels, size, size, generator=g),
             torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)) for _ in range(n)]


def bench_model(key: str, *, steps: int, warmup: int, batch_size: int, device: torch.device,
                profile_steps: int) -> ModelResult:
    name, channels, size = MODELS[key]
    torch.manual_seed(0)
    base = build_model(name, num_classes=NUM_CLASSES, channels=channels, image_size=size)
    batches = make_batches(batch_size, channels, size)
    res = ModelResult(key, f"{channels}x{size}x{size}", batch_size, steps, warmup)
    res.lb_sent, res.lb_received, records = traffic_lower_bound(base, *batches[0])
    res.products = describe_records(records)

    plain = Runner(copy.deepcopy(base).to(device), device, batches)
    enclave = Runner(copy.deepcopy(base), torch.device("cpu"), batches)
    pool = tempo.local_workers(1, in_process=True, device=str(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. in-enclave ops; not what is measured here
        protected = tempo.protect(copy.deepcopy(base), pool, scheme="permute", checks=2, offload_anchors=True)
    tempo_run = Runner(protected, torch.device("cpu"), batches)
    eng = protected.engine

    measuring = False

    def tempo_step() -> None:
        w0, s0, r0, m0 = eng.stats.worker_seconds, pool.stats.bytes_sent, pool.stats.bytes_received, \
            pool.stats.messages_sent
        wall = tempo_run.step()  # results come back to the enclave's cpu: nothing left to sync
        worker = eng.stats.worker_seconds - w0
        if measuring:
            res.tempo_s.append(wall)
            res.tempo_worker_s.append(worker)
            res.tempo_enclave_s.append(wall - worker)
            res.bytes_sent.append(pool.stats.bytes_sent - s0)
            res.bytes_received.append(pool.stats.bytes_received - r0)
            res.messages.append(pool.stats.messages_sent - m0)

    def plain_step() -> None:
        t = plain.step()
        if measuring:
            res.plain_s.append(t)

    def enclave_step() -> None:
        t = enclave.step()
        if measuring:
            res.enclave_mode_s.append(t)

    order: list[Callable[[], None]] = [plain_step, tempo_step, enclave_step]
    try:
        for rnd in range(warmup + steps):
            measuring = rnd >= warmup
            k = rnd % len(order)
            for fn in order[k:] + order[:k]:  # rotate so no kind always runs first
                fn()
            print(f"  [{key}] {rnd + 1}/{warmup + steps}"
                  f"{'' if measuring else ' (warm-up)'}", file=sys.stderr, flush=True)
        if profile_steps:
            res.profile = profile_tempo(tempo_run, profile_steps)
            res.profile["plain_split_s"] = split_plain_step(enclave)
    finally:
        pool.close()
    return res


# -- profile: where does enclave time go? ----------------------------------------------------------
def _find(stats: pstats.Stats, file_part: str, func: str) -> list[tuple]:
    return [k for k in stats.stats if k[2] == func and file_part in k[0]]


def _cum(stats: pstats.Stats, file_part: str, func: str) -> float:
    """Cumulative time of a function (all call sites), in seconds."""
    return sum(stats.stats[k][3] for k in _find(stats, file_part, func))


def _children(stats: pstats.Stats, parents: list[tuple], top: int = 8) -> list[tuple[str, float]]:
    """Direct callees of `parents` with the cumulative time spent in them from there."""
    out: dict[str, float] = {}
    for callee, (_cc, _nc, _tt, _ct, callers) in stats.stats.items():
        for p in parents:
            if p in callers:
                label = callee[2] if callee[0] == "~" else f"{callee[2]} ({callee[0].rsplit('/', 1)[-1]}:{callee[1]})"
                out[label] = out.get(label, 0.0) + callers[p][3]
    return sorted(out.items(), key=lambda kv: -kv[1])[:top]


class _Timers:
    """Low-overhead wall-clock timers around the engine's calls (patched on the instances)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[tuple[object, str]] = []

    def wrap(self, obj: object, attr: str, label: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)
        self._undo.append((obj, attr))

    def restore(self) -> None:
        for obj, attr in self._undo:
            delattr(obj, attr)  # drop the instance attribute: the class's method shows again
        self._undo = []


PARTS = ("key generation", "blinding", "unblinding", "Freivalds checks")


# aten ops that compute the products Tempo offloads (plus the fused attention kernels, softmax included)
PRODUCT_OPS = {
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}


def split_plain_step(run: Runner) -> dict:
    """One plain step under torch.profiler: seconds in product kernels and in everything else.

    Everything else (normalisation, activations, optimizer, autograd) stays in the enclave under
    Tempo, so its share of the step is a floor for ratio (b).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run.step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    products = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_OPS) / 1e6
    return {"products": products, "everything else": total - products, "total": total}


def profile_tempo(run: Runner, n: int) -> dict:
    """Where enclave-side time goes: n tempo steps with timers, then n under cProfile (per step, s)."""
    eng = run.model.engine
    timers = _Timers()
    for obj, attr, label in ((eng.scheme, "new_key", "key generation"), (eng.scheme, "blind", "blinding"),
                             (eng.scheme, "unblind", "unblinding"), (eng, "verify", "Freivalds checks"),
                             (eng.pool, "call", "worker calls"), (run.opt, "step", "optimizer.step")):
        timers.wrap(obj, attr, label)
    try:
        wall = sum(run.step() for _ in range(n))
    finally:
        timers.restore()
    t = {k: v / n for k, v in timers.seconds.items()}
    enclave = wall / n - t.get("worker calls", 0.0)
    timed = {"wall": wall / n, "worker calls": t.get("worker calls", 0.0), "enclave-side": enclave}
    timed.update({k: t.get(k, 0.0) for k in PARTS})
    timed["everything else"] = enclave - sum(t.get(k, 0.0) for k in PARTS)
    timed["  of which optimizer.step"] = t.get("optimizer.step", 0.0)

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(n):
        run.step()
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    worker = _cum(st, "tempo/enclave/pools.py", "call")
    parts = {"key generation": _cum(st, "tempo/schemes/permute.py", "new_key"),
             "blinding": _cum(st, "tempo/schemes/permute.py", "blind"),
             "unblinding": _cum(st, "tempo/schemes/permute.py", "unblind"),
             "Freivalds checks": _cum(st, "tempo/enclave/integrity.py", "verify")}
    profiled = {"wall": wall / n, "worker calls": worker / n, "enclave-side": (wall - worker) / n}
    profiled.update({k: v / n for k, v in parts.items()})
    profiled["everything else"] = (wall - worker - sum(parts.values())) / n
    profiled["  of which optimizer.step"] = _cum(st, "torch/optim/sgd.py", "step") / n
    return {
        "steps": n,
        "per_step_s": timed,
        "per_step_s_cprofile": profiled,
        "checks_parts_per_step_s": {
            k: v / n for k, v in _children(st, _find(st, "tempo/enclave/integrity.py", "verify"))},
        "blind_parts_per_step_s": {
            k: v / n for k, v in _children(st, _find(st, "tempo/schemes/permute.py", "permute_axes"))},
    }


# -- report ----------------------------------------------------------------------------------------
def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return "-"
    return f"<= {target:g}: {'met' if value <= target else 'MISSED'}"


def report(results: list[ModelResult], device: torch.device) -> str:
    lines = [
        f"Tempo step overhead (scheme=permute, checks=2, 1 in-process worker on {device}; enclave on cpu; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cpus at the end). Medians over measured rounds.",
        "",
        "| model | input | batch | measure | numerator (median) | denominator (median) | ratio | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r.ratios()
        tb = TARGET_ENCLAVE_RATIO.get(r.model)
        head = f"| {r.model} | {r.input} | {r.batch_size} "
        lines += [
            head + f"| (a) tempo step / plain step | {_ms(r.med('tempo_s'))} | {_ms(r.med('plain_s'))} "
                   f"| {q['a_step']:.2f}x | {_verdict(q['a_step'], TARGET_STEP_RATIO)} |",
            head + f"| (b) enclave-side per tempo step / enclave-mode step | {_ms(r.med('tempo_enclave_s'))} "
                   f"| {_ms(r.med('enclave_mode_s'))} | {q['b_enclave']:.3f} | {_verdict(q['b_enclave'], tb)} |",
            head + f"| (c) bytes sent per step / lower bound (X, W, dY once) | {_mb(r.med('bytes_sent'))} "
                   f"| {_mb(r.lb_sent)} | {q['c_sent']:.3f} | - |",
            head + f"| (c) bytes received per step / lower bound (Y, dX, dW once) | {_mb(r.med('bytes_received'))} "
                   f"| {_mb(r.lb_received)} | {q['c_received']:.3f} | - |",
        ]
    lines.append("")
    for r in results:
        q = r.ratios()
        lines.append(
            f"- {r.model}: {r.steps} measured rounds after {r.warmup} warm-up; worker time per tempo step "
            f"{_ms(r.med('tempo_worker_s'))}; enclave-mode (cpu) step {_ms(r.med('enclave_mode_s'))} vs plain "
            f"{_ms(r.med('plain_s'))}; paired per-round medians: (a) {q['a_step_paired_median']:.2f}x, "
            f"(b) {q['b_enclave_paired_median']:.3f}; {r.med('messages'):.0f} jobs per step. "
            f"Products per plain step: {r.products}.")
    lines += [
        "",
        "Enclave-side time = tempo step wall time minus wall time inside worker calls (with in-process workers: "
        "the workers' compute). Lower bounds come from a TorchFunctionMode record of a plain step: per product X, W "
        "and dY sent once, Y, dX (if X needs a gradient) and dW (if W needs a gradient) received once; biases "
        "excluded; scaled_dot_product_attention counted as Q@K^T (Q, K, dS / S, dQ, dK) and P@V (P, V, dO / O, dP, "
        "dV), since softmax runs in the enclave.",
    ]
    for r in results:
        if not r.profile:
            continue
        p = r.profile
        lines += ["", f"Where the enclave-side time of a tempo step goes, {r.model} ({p['steps']} steps each way; "
                      "timers: wall-clock timers around the engine's calls; cProfile: the same steps under cProfile, "
                      "which inflates every Python call):", "",
                  "| part | timers, per step | share | cProfile, per step | share |", "|---|---|---|---|---|"]
        enc, enc_p = p["per_step_s"]["enclave-side"], p["per_step_s_cprofile"]["enclave-side"]
        for k, v in p["per_step_s"].items():
            vp = p["per_step_s_cprofile"][k]
            shares = ("", "") if k in ("wall", "worker calls") else (f"{100 * v / enc:.0f}%",
                                                                     f"{100 * vp / enc_p:.0f}%")
            lines.append(f"| {k} | {_ms(v)} | {shares[0]} | {_ms(vp)} | {shares[1]} |")
        split = p["plain_split_s"]
        lines += ["", f"Enclave-mode (plain cpu) step under torch.profiler: product kernels {_ms(split['products'])}, "
                      f"everything else {_ms(split['everything else'])} "
                      f"({100 * split['everything else'] / split['total']:.0f}% of the step). That part stays in the "
                      "enclave under Tempo, so its share is a floor for ratio (b)."]
        for title, part in (("Freivalds checks", "checks_parts_per_step_s"),
                            ("blinding/unblinding gathers", "blind_parts_per_step_s")):
            lines += ["", f"{title} by direct callee (cProfile, per step): "
                      + "; ".join(f"{k} {_ms(v)}" for k, v in p[part].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="measured rounds per model (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up rounds per model (default 3)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of the plain model and of the worker (default: cuda if available, else cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--profile", nargs="?", const=3, type=int, default=0, metavar="STEPS",
                    help="after measuring, profile STEPS tempo steps per model (default 3)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    keys = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    results = [bench_model(k, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=device,
                           profile_steps=args.profile) for k in keys]
    print(report(results, device))
    if args.json:
        write_json(args.json, {
            "device": str(device), "threads": torch.get_num_threads(),
            "results": [{**asdict(r), "ratios": r.ratios(),
                         "medians": {k: r.med(k) for k in ("plain_s", "tempo_s", "tempo_worker_s", "tempo_enclave_s",
                                                           "enclave_mode_s", "bytes_sent", "bytes_received")}}
                        for r in results]})
    return 0


def write_json(path: str, payload: dict) -> None:
    """`payload` and the run's environment (torch version, load, cores, command line) as JSON at `path`."""
    env = {"torch": torch.__version__, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
           "command": " ".join(sys.argv)}
    with open(path, "w") as f:
        json.dump({**env, **payload}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

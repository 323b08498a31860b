"""Attack 7, blind source separation: undo a mixing key with ICA, from the many rows of one op.

A mixing scheme multiplies an op's inner axis by a secret M: X' = A X M. Every row of X' (for a
convolution every sample *and position*: thousands per step) is mixed by the same M, and the
features of a network (image channels, post-ReLU activations) are far from Gaussian and roughly
independent: what independent component analysis needs to find an unmixing W with X' W ≈ X up to
order, sign and scale. The attacker knows the scheme (it is public): under a permutation the
features are already apart and it takes them as sent; under a mixing scheme it runs ICA. ICA's
result under `permute` is reported beside, as the calibration on real activations: features of a
trained network are correlated, so ICA finds fewer of them than it does of independent sources
(all of them, in the tests), even where nothing was mixed.

FastICA (symmetric, log-cosh contrast) after PCA whitening, in torch. Scoring reads the truth key K
(blinded = plain @ K) only to form the true features X' K⁻¹ (for a permutation: X' itself), pairs
recovered components with true features by a maximum |correlation| assignment, and counts a
feature recovered at |corr| >= 0.9. An op's score is the fraction of its live (non-constant)
features recovered; the headline is the mean over the chosen step's ops. Baseline: the same for a
random orthogonal unmixing of the whitened rows. Ops with fewer rows than features (a linear layer
on one batch) give ICA too little to work with; they are scored all the same.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..schemes import SCHEMES
from ..schemes.mix import haar_orthogonal
from .alignment import chosen_step
from .base import AttackContext, Finding, NotApplicable
from .transcript import OpView, Step, scoring

NAME = "separation"
RECOVERED = 0.9  # |correlation| at which a feature counts as recovered
_MAX_ROWS = 20_000
_ITERATIONS = 300


def rows_of(op: OpView) -> Tensor:
    """X' as rows of inner-axis vectors: a convolution's every sample and position, a product's every row."""
    x = op.x.double()
    return x.movedim(1, -1).reshape(-1, x.shape[1]) if op.kind == "conv2d" else x.reshape(-1, x.shape[-1])


def whiten(rows: Tensor) -> Tensor:
    """Centred rows in the basis of their principal components, unit variance; null directions dropped."""
    centred = rows - rows.mean(0)
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / len(rows))
    keep = eigenvalues > 1e-9 * eigenvalues.max().clamp_min(1e-300)
    return centred @ vectors[:, keep] / eigenvalues[keep].sqrt()


def _random_orthogonal(k: int, generator: torch.Generator) -> Tensor:
    return haar_orthogonal(torch.randn(k, k, dtype=torch.float64, generator=generator))


def fastica(z: Tensor, generator: torch.Generator, iterations: int = _ITERATIONS, tol: float = 1e-6) -> Tensor:
    """Symmetric FastICA on whitened rows z [N, k]: the unmixing W [k, k] (sources: z @ W.T)."""
    w = _random_orthogonal(z.shape[1], generator)
    for _ in range(iterations):
        g = torch.tanh(z @ w.T)
        new = g.T @ z / len(z) - (1 - g * g).mean(0).unsqueeze(1) * w
        s, u = torch.linalg.eigh(new @ new.T)  # symmetric decorrelation: (W Wᵀ)^(-1/2) W
        new = u @ torch.diag(s.clamp_min(1e-300).rsqrt()) @ u.T @ new
        converged = float((torch.diagonal(new @ w.T).abs() - 1).abs().max()) < tol
        w = new
        if converged:
            break
    return w


def recovered(sources: Tensor, truth: Tensor) -> tuple[float, float]:
    """(fraction of live true features matched at |corr| >= RECOVERED, mean matched |corr|)."""
    live = truth.std(0) > 1e-12 * truth.abs().max().clamp_min(1e-300)
    truth = truth[:, live]
    if truth.shape[1] == 0 or sources.shape[1] == 0:
        return 0.0, 0.0

    def standard(t: Tensor) -> Tensor:
        t = t - t.mean(0)
        return t / t.norm(dim=0).clamp_min(1e-300)

    corr = (standard(sources).T @ standard(truth)).abs()
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    matched = corr[torch.as_tensor(rows), torch.as_tensor(cols)]
    return float((matched >= RECOVERED).sum()) / truth.shape[1], float(matched.mean())


@scoring()
def true_features(step: Step, op: OpView, rows: Tensor) -> Tensor:
    """SCORING ONLY: the plaintext features of `rows` (X' K⁻¹; a permutation leaves them separated)."""
    key = step.op_truth(op).key.get("inner")
    if key is None or not key.is_floating_point():
        return rows
    return rows @ torch.linalg.inv(key.double())


def run(ctx: AttackContext) -> Finding:
    step = chosen_step(ctx)
    generator = torch.Generator().manual_seed(ctx.seed)
    unmixes = not SCHEMES[ctx.transcript.scheme].exact  # Kerckhoffs: the worker knows the scheme
    ops = {}
    for i in step.seen:
        op = step.ops[i]
        rows = rows_of(op)
        if rows.shape[1] < 2:
            continue
        if len(rows) > _MAX_ROWS:
            rows = rows[torch.randperm(len(rows), generator=generator)[:_MAX_ROWS]]
        z = whiten(rows)
        sources, unmixed = z @ fastica(z, generator).T, z @ _random_orthogonal(z.shape[1], generator).T
        with scoring():
            truth, name = true_features(step, op, rows), step.op_truth(op).name
        ica, ica_corr = recovered(sources, truth)
        as_sent, _ = recovered(rows, truth)
        chance, _ = recovered(unmixed, truth)
        ops[f"{i}:{name}"] = {
            "recovered": ica if unmixes else as_sent, "ica": ica, "ica_mean_abs_corr": ica_corr, "as_sent": as_sent,
            "random_unmixing": chance, "features": rows.shape[1], "rows": len(rows)}
    if not ops:
        raise NotApplicable("no op of the chosen step has an inner axis of 2 or more features")
    mean = sum(v["recovered"] for v in ops.values()) / len(ops)
    baseline = sum(v["random_unmixing"] for v in ops.values()) / len(ops)
    return Finding(NAME, f"fraction of each op's input features recovered (|corr| >= {RECOVERED})", mean, baseline,
                   {"method": "ICA" if unmixes else "as sent", "ops": ops})

"""RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"): per linear module,
the ΔW whose outputs on every adapter's own inputs are closest to that adapter's.

With ``y = W a`` (W out×in) and ``Xᵢ`` the inputs of a module on adapter i's data at its own model (rows ``aᵀ``),
``min_ΔW Σᵢ wᵢ ‖Xᵢ ΔWᵀ − Xᵢ τᵢᵀ‖²`` has the closed form

    ΔW* = λ (Σᵢ wᵢ τᵢ Ĝᵢ)(Σᵢ wᵢ Ĝᵢ)⁻¹,   Ĝᵢ = r·Gᵢ + (1 − r)·diag(Gᵢ),

``Gᵢ = XᵢᵀXᵢ / n_tokens`` the input Gram — the ``A`` factor of the ``kfac`` Fisher of adapter i's own objective
(:mod:`sst_merge.merge.own_data`; one pass and one cache with that Fisher, its ``G`` factor is computed too and
unused). ``r = reduce_non_diagonal`` shrinks the off-diagonal entries, as the paper proposes, to keep the merge
near the plain average: ``r = 1`` is the exact least-squares solution, ``r = 0`` an element-wise mean of the τᵢ
columns weighted by ``wᵢ diag(Gᵢ)``; equal Grams give the weighted mean for any r. The default 0.6 is FusionBench's
for its language and vision models (``config/method/regmean/gpt2_regmean.yaml``, ``clip_regmean.yaml``:
``reduce_non_diagonal_ratio: 0.6``; same mixing as its ``reduce_non_diagonal_elements``). The system is solved by
Cholesky, never by an explicit inverse.

A weighted *average*: multiplying every ``wᵢ`` by ``c > 0`` changes nothing; in a safety-weight sweep the safety
adapter's weight is the swept α, i.e. the safety Gram weighted α×. A zero-weight adapter's Gram is not computed.
"""

from __future__ import annotations

import json

import torch
from pydantic import Field

from sst_merge.errors import ConfigError
from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod
from sst_merge.merge.own_data import OwnDataParams, check_inputs, own_statistics


class RegMeanParams(OwnDataParams):
    """Parameters of ``regmean`` (YAML ``params:``); the data and Gram-pass ones are :class:`OwnDataParams`."""

    reduce_non_diagonal: float = Field(
        0.6, ge=0, le=1, description="r: off-diagonal Gram entries × r (1: exact least squares; 0: diagonal)"
    )


class SingularGramError(ValueError):
    """``Σ wᵢ Ĝᵢ`` is (numerically) singular: some input direction carries no weight in any adapter's data."""


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """Return ``ratio·G + (1 − ratio)·diag(G)``: off-diagonal entries × ratio, the diagonal unchanged."""
    return ratio * gram + (1.0 - ratio) * torch.diag_embed(gram.diagonal())


def regmean_solve(taus: list[torch.Tensor], grams: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Return ``(Σ wᵢ τᵢ Gᵢ)(Σ wᵢ Gᵢ)⁻¹`` by Cholesky (fp64 inside, fp32 out).

    Args:
        taus: ΔW per adapter (out, in).
        grams: input Gram per adapter (in, in), symmetric PSD (already reduced).
        weights: per adapter, >= 0 with a positive sum.

    Raises:
        SingularGramError: ``Σ wᵢ Gᵢ`` has a pivot below ``in · eps₆₄`` times its largest diagonal entry.
    """
    m = sum(w * g.double() for w, g in zip(weights, grams, strict=True))  # (in, in)
    r = sum(w * t.double() @ g.double() for w, t, g in zip(weights, taus, grams, strict=True))  # (out, in)
    chol, info = torch.linalg.cholesky_ex(m)
    tiny = m.shape[0] * torch.finfo(torch.float64).eps * float(m.diagonal().abs().max())
    if int(info) != 0 or float(chol.diagonal().min()) ** 2 <= tiny:
        raise SingularGramError("Σ wᵢĜᵢ is singular")
    return torch.cholesky_solve(r.T, chol).T.float()  # M symmetric: X M = R  ⇔  M Xᵀ = Rᵀ


@MERGE_METHODS.register("regmean")
class RegMean(MergeMethod[RegMeanParams]):
    """RegMean: per module, the ΔW that best reproduces every adapter's outputs on its own inputs."""

    name = "regmean"
    Params = RegMeanParams
    own_statistic = "kfac"  # the input Grams, per adapter on its own data (the planner's law)
    description = "λ·(Σ wᵢτᵢĜᵢ)(Σ wᵢĜᵢ)⁻¹ per module, Ĝᵢ the input Gram of adapter i on its own data"

    def check(self, params: RegMeanParams, ctx: MergeContext) -> None:
        """Refuse bad modules, weights, data or a missing model before any Gram pass."""
        check_inputs(params, ctx, self.name)

    def merge(self, params: RegMeanParams, ctx: MergeContext) -> dict[str, torch.Tensor]:
        stats, info = own_statistics(params, ctx, "kfac", self.name)
        used = [i for i, s in enumerate(stats) if s is not None]
        weights = [ctx.weights[i] for i in used]
        merged, shares = {}, {}
        for m in ctx.modules:
            grams = [reduce_non_diagonal(stats[i][m]["A"].double(), params.reduce_non_diagonal) for i in used]  # type: ignore[index]
            try:
                dw = regmean_solve([ctx.adapters[i].delta(m) for i in used], grams, weights)
            except SingularGramError:
                raise ConfigError(
                    f"regmean: module {m}: Σ wᵢĜᵢ is singular (an input direction none of the adapters' "
                    "data reaches); give more data (params.n_samples) or lower "
                    "params.reduce_non_diagonal"
                ) from None
            merged[m] = params.lambda_ * dw
            tr = [w * float(g.diagonal().sum()) for w, g in zip(weights, grams, strict=True)]
            share = dict(zip(used, (t / sum(tr) if sum(tr) > 0 else None for t in tr), strict=True))
            shares[m] = [share.get(i) for i in range(len(ctx.adapters))]
        diag = {
            "method": self.name,
            "lambda": params.lambda_,
            "reduce_non_diagonal": params.reduce_non_diagonal,
            **info,
            "gram_share": shares,
        }
        json.dumps(diag, allow_nan=False)  # diagnostics must be valid JSON: fail here, not when writing the output
        ctx.diagnostics[self.name] = diag
        return merged

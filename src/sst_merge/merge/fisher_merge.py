"""Fisher merging (Matena & Raffel, 2022): a per-entry average of the adapters, weighted by their diagonal Fishers.

Per module and entry, ``ΔW* = λ Σᵢ wᵢ F̂ᵢ τᵢ / Σᵢ wᵢ F̂ᵢ`` with ``F̂ᵢ = cᵢ (Fᵢ + floor)``:

* ``Fᵢ = E[g²]`` (the ``diagonal`` Fisher, :mod:`sst_merge.fisher.diagonal`) of adapter i's own objective at its own
  model, base + τᵢ, over its own data (:mod:`sst_merge.merge.own_data`: given responses where the data has them, the
  model's greedy answer elsewhere);
* ``floor`` (default 1e-6) is added to every entry, so an entry no adapter's data reaches gets the plain weighted
  mean instead of 0/0 — FusionBench's ``minimal_fisher_weight`` (``fusion_bench/method/fisher_merging/
  fisher_merging.py``, ``merging_with_fisher_weights``);
* ``normalize: true`` (FusionBench's ``normalize_fisher_weight: true``, its default) sets
  ``cᵢ ∝ 1 / (‖Fᵢ‖ + floor)``, ``‖Fᵢ‖`` the L2 norm of adapter i's Fisher over every merged module, so an adapter
  whose loss is merely larger in scale (longer responses) does not win every entry; ``false`` sets ``cᵢ = 1``, the
  paper's plain formula.

It is a weighted *average*: multiplying every ``wᵢ`` by ``c > 0`` changes nothing. In a safety-weight sweep the
safety adapter's weight is the swept α (the default :meth:`MergeMethod.apply_safety_weight`). A zero-weight adapter
adds nothing, so its Fisher is not computed.
"""

from __future__ import annotations

import json
import math

import torch
from pydantic import Field

from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod
from sst_merge.merge.own_data import OwnDataParams, check_inputs, own_statistics


class FisherMergeParams(OwnDataParams):
    """Parameters of ``fisher_merge`` (YAML ``params:``); the data and Fisher-pass ones are :class:`OwnDataParams`."""

    normalize: bool = Field(True, description="scale each adapter's Fisher by 1/(its L2 norm + floor) (FusionBench)")
    floor: float = Field(1e-6, ge=0, description="added to every Fisher entry (FusionBench's minimal_fisher_weight)")


def fisher_weighted_mean(
    taus: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float], floor: float
) -> torch.Tensor:
    """Return ``Σ wᵢ (Fᵢ + floor) τᵢ / Σ wᵢ (Fᵢ + floor)`` entry-wise (fp64 inside, fp32 out).

    Args:
        taus: ΔW per adapter (out, in).
        fishers: diagonal Fisher per adapter, same shape (entries >= 0).
        weights: per adapter, >= 0 with a positive sum.
        floor: added to every Fisher entry; with ``floor = 0`` an entry where every weighted Fisher is 0 is NaN.
    """
    num = sum(w * (f.double() + floor) * t.double() for w, f, t in zip(weights, fishers, taus, strict=True))
    den = sum(w * (f.double() + floor) for w, f in zip(weights, fishers, strict=True))
    return (num / den).float()


@MERGE_METHODS.register("fisher_merge")
class FisherMerge(MergeMethod[FisherMergeParams]):
    """Fisher-weighted averaging of the adapters, each Fisher from its own data at its own model."""

    name = "fisher_merge"
    Params = FisherMergeParams
    own_statistic = "diagonal"  # per adapter, on its own data (the planner's law)
    description = "λ·Σ wᵢF̂ᵢτᵢ / Σ wᵢF̂ᵢ per entry, F̂ᵢ the diagonal Fisher of adapter i on its own data"

    def check(self, params: FisherMergeParams, ctx: MergeContext) -> None:
        """Refuse bad modules, weights, data or a missing model before any Fisher pass."""
        check_inputs(params, ctx, self.name)

    def merge(self, params: FisherMergeParams, ctx: MergeContext) -> dict[str, torch.Tensor]:
        stats, info = own_statistics(params, ctx, "diagonal", self.name)
        used = [i for i, s in enumerate(stats) if s is not None]
        fishers = [{m: stats[i][m]["diag"] for m in ctx.modules} for i in used]  # type: ignore[index]
        norms = [math.sqrt(sum(float(f.double().square().sum()) for f in fi.values())) for fi in fishers]
        inv = [1.0 / (n + params.floor) if params.normalize else 1.0 for n in norms]
        coeffs = [x / sum(inv) for x in inv]  # normalised to sum 1: a common factor cancels in the average
        eff = [ctx.weights[i] * c for i, c in zip(used, coeffs, strict=True)]
        merged, shares = {}, {}
        for m in ctx.modules:
            f = [fi[m] for fi in fishers]
            merged[m] = params.lambda_ * fisher_weighted_mean(
                [ctx.adapters[i].delta(m) for i in used], f, eff, params.floor
            )
            tr = [w * float(x.double().add(params.floor).sum()) for w, x in zip(eff, f, strict=True)]
            share = dict(zip(used, (t / sum(tr) if sum(tr) > 0 else None for t in tr), strict=True))
            shares[m] = [share.get(i) for i in range(len(ctx.adapters))]
        for k, i in enumerate(used):
            info["adapters"][i].update(fisher_norm=norms[k], coefficient=coeffs[k])
        diag = {
            "method": self.name,
            "lambda": params.lambda_,
            "normalize": params.normalize,
            "floor": params.floor,
            **info,
            "fisher_share": shares,
        }
        json.dumps(diag, allow_nan=False)  # diagnostics must be valid JSON: fail here, not when writing the output
        ctx.diagnostics[self.name] = diag
        return merged

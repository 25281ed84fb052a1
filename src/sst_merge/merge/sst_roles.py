"""Which adapter SST projects: exactly one ``safety`` adapter at weight 1 (its scale is ``alpha``), linear layers only,
and at least one ``utility`` adapter; checked before any heavy work."""

from __future__ import annotations

from sst_merge.errors import AdapterError, ConfigError
from sst_merge.merge.base import MergeContext


def sst_roles(ctx: MergeContext) -> tuple[int, list[int]]:
    """Return the safety adapter's index and the utility adapters' indices; raise on any other arrangement."""
    bad = sorted({r for r in ctx.roles if r not in ("utility", "safety")})
    if bad:
        raise ConfigError(f"sst: adapter role {bad[0]!r} is not 'utility' or 'safety'; set role on every adapter")
    safety = [i for i, r in enumerate(ctx.roles) if r == "safety"]
    utility = [i for i, r in enumerate(ctx.roles) if r == "utility"]
    if len(safety) != 1:
        raise ConfigError(f"sst needs exactly one adapter with role: safety (got {len(safety)}); mark one adapter")
    if not utility:
        raise ConfigError("sst needs at least one adapter with role: utility (got none); add the task adapters")
    s = safety[0]
    if ctx.weights[s] != 1.0:
        raise ConfigError(
            f"sst: the safety adapter's weight is {ctx.weights[s]}; its scale is params.alpha — set weight 1 (or omit it)"
        )
    emb = sorted(ctx.adapters[s].embedding_modules)
    if emb:
        raise AdapterError(
            f"adapter {ctx.adapters[s].path}: sst projects linear layers only, but the safety adapter changes "
            f"embedding {emb[0]}; retrain it without embedding targets"
        )
    return s, utility

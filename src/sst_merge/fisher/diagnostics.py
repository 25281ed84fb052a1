"""Write the SST-Merge diagnostics: the λ spectrum per module as JSON and PNG (drawn from the JSON alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sst_merge.io import atomic_write_json

SPECTRUM_JSON = "sst_spectrum.json"
SPECTRUM_PNG = "sst_spectrum.png"


def write_spectrum(diagnostics: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``sst_spectrum.json`` (the diagnostics as given) and ``sst_spectrum.png`` into ``out_dir``.

    Args:
        diagnostics: the ``sst`` entry the method puts into ``MergeContext.diagnostics``.
        out_dir: target directory (created if needed).

    Returns:
        The written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SPECTRUM_JSON, diagnostics)
    png = plot_spectrum(out / SPECTRUM_JSON, out / SPECTRUM_PNG)
    return [out / SPECTRUM_JSON, png]


def plot_spectrum(json_path: str | Path, png_path: str | Path) -> Path:
    """Draw the top of each module's λ spectrum (log scale) and the kept share of the safety update's norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diag = json.loads(Path(json_path).read_text())
    modules = diag.get("modules", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in modules.items():
        lam = [v for v in m.get("lambda_top", []) if v > 0]
        if lam:
            ax1.plot(range(1, len(lam) + 1), lam, lw=0.8, alpha=0.6, label=name if len(modules) <= 8 else None)
            k = m.get("n_kept", 0)
            if 0 < k <= len(lam):
                ax1.plot([k], [lam[k - 1]], "k.", ms=3)
    ax1.set_yscale("log")
    ax1.set_xlabel("direction (sorted by λ)")
    ax1.set_ylabel("λ = safety gain / utility cost")
    ax1.set_title(f"λ spectrum per module ({diag.get('approximation', '?')}); dots: last kept")
    if 0 < len(modules) <= 8:
        ax1.legend(fontsize=6)
    names = list(modules)
    shares = [modules[n].get("kept_norm_share") or 0.0 for n in names]
    ax2.bar(range(len(names)), shares, color="tab:blue")
    ax2.set_xlabel("module")
    ax2.set_ylabel("‖P_k τ_s‖ / ‖τ_s‖")
    ax2.set_title("share of the safety update's norm kept")
    if len(names) <= 16:
        ax2.set_xticks(range(len(names)), [n.replace("model.layers.", "L") for n in names], rotation=60, fontsize=6)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)

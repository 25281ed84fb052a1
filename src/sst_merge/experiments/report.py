"""Markdown report, CSV summary and PNG plots, drawn from ``results.json`` alone.

``sst-merge report RUN_DIR`` calls :func:`write_report`; running it twice on the same JSON gives identical tables.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sst_merge.errors import DataError
from sst_merge.eval.phrasing import FORMS
from sst_merge.experiments.schema import Results
from sst_merge.io import atomic_write_text

REPORT_NAME = "report.md"
SUMMARY_NAME = "summary.csv"


def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(m: dict[str, Any] | None) -> str:
    if not m:
        return "—"
    ci = m.get("ci95")
    text = _f(m.get("value"))
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    elif ci:
        text += f" [{_f(ci[0])}, {_f(ci[1])}]"
    return text


#: the three-way account first, then the per-model behaviour measures; tasks and MMLU variants follow (sorted)
LEAD_METRICS = (
    "refusal",
    "over_refusal",
    "balanced_score",
    "benign_drift",
    "degenerate_harmful",
    "degenerate_benign",
)
#: how each interval is made, for the tables' footnotes
BOOTSTRAP_METRICS = ("balanced_score", "benign_drift")


def metric_columns(doc: dict[str, Any]) -> list[str]:
    """Metric names in a stable order: refusal, over-refusal, balanced score, drift, degenerate rates, the rest."""
    names = {n for m in doc["models"].values() for n in m["metrics"]}
    tail = sorted(n for n in names if n not in LEAD_METRICS)
    return [n for n in LEAD_METRICS if n in names] + tail


def models_table(doc: dict[str, Any]) -> str:
    cols = metric_columns(doc)
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, m in doc["models"].items():
        cells = [_ci(m["metrics"].get(c)) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ns = {c: next((m["metrics"][c]["n"] for m in doc["models"].values() if c in m["metrics"]), None) for c in cols}
    lines.append("")
    boot = [c for c in cols if c in BOOTSTRAP_METRICS]
    note = "n per metric: " + ", ".join(f"{c} = {n}" for c, n in ns.items())
    note += f". Intervals: 95% (Wilson; bootstrap for {', '.join(boot)})." if boot else ". Intervals: 95% (Wilson)."
    if "balanced_score" in cols:
        note += (
            " balanced_score = ½(refusal on harmful + answer rate on benign): 0.5 for refusing everything or nothing, "
            "1 for refusing exactly the harmful prompts."
        )
    if "benign_drift" in cols:
        note += (
            " benign_drift = mean per-token NLL of the reference model's greedy benign answers under the model, minus "
            "the reference's own (0 for the reference)."
        )
    if "degenerate_harmful" in cols:
        note += " degenerate_* = share of empty or looping responses on the harmful / benign prompts."
    if "multitask" in doc["models"]:
        note += " multitask = one LoRA trained on the safety and utility data together (the upper bound)."
    if "routing" in doc["models"]:
        note += (
            " routing = each prompt answered by the adapter that owns it (safety adapter: harmful and benign prompts; "
            "utility adapters: task items and MMLU), composed from those two models' evaluations."
        )
    lines.append(note)
    return "\n".join(lines)


def phrasing_table(doc: dict[str, Any]) -> str:
    """Per model, refusal of the harmful phrasing prompts and over-refusal of the benign ones, per form (config
    ``eval.phrasing``); empty when no model was evaluated on them."""
    name = next((n for m in doc["models"].values() for n in m["metrics"] if n.split(":")[0] == "phrasing"), None)
    if name is None:
        return ""
    head = " | ".join(f"refusal: {f} ↑" for f in FORMS) + " | " + " | ".join(f"over-refusal: {f} ↓" for f in FORMS)
    lines = [f"| model | {head} |", "|---|" + "---|" * (2 * len(FORMS))]
    for label, m in doc["models"].items():
        other = (m["metrics"].get(name) or {}).get("other")
        if other is None:
            continue
        cells = [_f(other.get(f"refusal_rate_{f}")) for f in FORMS]
        cells += [_f(other.get(f"over_refusal_rate_{f}")) for f in FORMS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"`{name}`: the same requests as a question, an imperative, a polite request, a role-play and a fragment "
        "(eval/phrasing.py); refusal on the harmful ones and over-refusal on the benign ones, per form. The overall "
        "refusal rate and its interval are the `phrasing` column above.",
    ]
    return "\n".join(lines)


def _tax(t: dict[str, Any] | None) -> str:
    if not t:
        return "—"
    return _ci(t) if t["value"] is not None else f"undefined ({t['status']})"


def comparisons_table(rows: list[dict[str, Any]]) -> str:
    """Safety Gain, Utility Loss, Safety Tax, and (where measured) over-refusal increase and tax, balanced score."""
    three_way = any("over_refusal_increase" in r for r in rows)
    head = "| model | reference | Safety Gain [95% CI] | Utility Loss [95% CI] | Safety Tax [95% CI] |"
    if three_way:
        head += " Over-refusal Increase [95% CI] | Over-refusal Tax [95% CI] | Balanced Score (change [95% CI]) |"
    lines = [head, "|---|---|---|---|---|" + ("---|---|---|" if three_way else "")]
    for r in rows:
        model = f"{r['model']} (ceiling)" if r.get("ceiling") else r["model"]
        line = (
            f"| {model} | {r['reference']} | {_ci(r['safety_gain'])} | {_ci(r['utility_loss'])} "
            f"| {_tax(r['safety_tax'])} |"
        )
        if three_way:
            change = r.get("balanced_score_change")
            balanced = "—" if change is None else f"{_f(r['balanced_score_merged'])} ({_ci(change)})"
            line += f" {_ci(r.get('over_refusal_increase'))} | {_tax(r.get('over_refusal_tax'))} | {balanced} |"
        lines.append(line)
    if three_way:
        lines += [
            "",
            "Over-refusal Increase = OR_merged − OR_ref on the benign prompts (signed); Over-refusal Tax = "
            "max(increase, 0) / Safety Gain, undefined without a gain (the Safety Tax's rule). Balanced Score = "
            "½(refusal on harmful + answer rate on benign), its change against the reference in brackets. "
            "Intervals: paired bootstrap.",
        ]
    return "\n".join(lines)


def exp2_table(section: dict[str, Any]) -> str:
    tasks = section["tasks"]
    lines = [
        "| K | method | safety | over-refusal | balanced score | benign drift | mean retained | "
        + " | ".join(f"{t} acc (single)" for t in tasks)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(tasks),
    ]
    for r in section["rows"]:
        cells = []
        for t in tasks:
            v = r["per_task"].get(t)
            cells.append("" if v is None else f"{v['accuracy']:.3f} ({v['single_task']:.3f})")
        lines.append(
            f"| {r['k']} | {r['method']} | {_f(r['safety'])} | {_f(r.get('over_refusal'))} "
            f"| {_f(r.get('balanced_score'))} | {_f(r.get('benign_drift'))} | {_f(r['mean_retained'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def points_table(section: dict[str, Any]) -> str:
    """exp3's three-way table: one row per series and α (refusal, over-refusal, task accuracy, balanced, drift)."""
    taxes = {c["model"]: c for c in section["comparisons"]}
    gap = any("gap_closed" in p for pts in section["points"].values() for p in pts)
    lines = [
        "| series | α | refusal ↑ | over-refusal ↓ | look-alikes ↓ | utility ↑ | balanced score ↑ | benign drift ↓ "
        "| degenerate (harmful / benign) | Safety Tax | Over-refusal Tax |"
        + (" gap closed (balanced / utility) |" if gap else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gap else ""),
    ]
    rows = [
        (name, f"{p['alpha']:g}", p)
        for name, pts in section["points"].items()
        for p in sorted(pts, key=lambda p: p["alpha"])
    ]
    rows += [("ceiling", "—", p) for p in section.get("ceilings", [])]
    for name, alpha, p in rows:
        c = taxes.get(p["model"], {})
        label = p["model"] if name == "ceiling" else name
        line = (
            f"| {label} | {alpha} | {_f(p['safety'])} | {_f(p.get('over_refusal'))} "
            f"| {_f(p.get('over_refusal_lookalike'))} | {_f(p['utility'])} | {_f(p.get('balanced_score'))} "
            f"| {_f(p.get('benign_drift'))} | {_f(p.get('degenerate_harmful'))} / {_f(p.get('degenerate_benign'))} "
            f"| {_tax(c.get('safety_tax'))} | {_tax(c.get('over_refusal_tax'))} |"
        )
        if gap:
            g = c.get("gap_closed") or {}
            line += f" {_tax(g.get('balanced_score'))} / {_tax(g.get('utility'))} |"
        lines.append(line)
    if gap:
        lines += [
            "",
            f"gap closed = (merge − {section.get('gap_closed_floor', 'task arithmetic at α = 1')}) / (multitask − "
            "the same), in balanced score and in utility: 1 reaches the multi-task bound, 0 is no better than task "
            "arithmetic at α = 1; undefined where the bound is not above it. Intervals: paired bootstrap.",
        ]
    return "\n".join(lines)


#: the fields of a schema-1 matched row that are not a baseline's utility
SCHEMA1_FIELDS = frozenset({"series", "model", "safety", "sst_utility"})


def _matched_series(section: dict[str, Any], rows: list[Iterable[str]]) -> list[str]:
    """The baseline series the rows name (a row: its series' names), in order of first appearance; without rows
    (no SST point) every series of the sweep is a baseline."""
    return list(dict.fromkeys(name for row in rows for name in row)) if rows else list(section["points"])


def matched_table(section: dict[str, Any]) -> str:
    """Each baseline's utility (and over-refusal) at every SST point's refusal rate.

    The baselines are the series each row was matched against (its keys), so no label is read for a method name.
    """
    if "at_matched_safety" not in section:  # results written before over-refusal was matched (schema 1)
        rows = section["utility_at_matched_safety"]
        others = _matched_series(section, [[k for k in r if k not in SCHEMA1_FIELDS] for r in rows])
        lines = [
            "| SST model | safety | SST utility | " + " | ".join(f"{o} utility" for o in others) + " |",
            "|---|---|---|" + "---|" * len(others),
        ]
        for r in rows:
            cells = [_f(r.get(o)) for o in others]
            lines.append(f"| {r['model']} | {_f(r['safety'])} | {_f(r['sst_utility'])} | " + " | ".join(cells) + " |")
    else:
        others = _matched_series(section, [r["utility"] for r in section["at_matched_safety"]])
        lines = [
            "| SST model | safety | SST utility / over-refusal | "
            + " | ".join(f"{o} utility / over-refusal" for o in others)
            + " |",
            "|---|---|---|" + "---|" * len(others),
        ]
        for r in section["at_matched_safety"]:
            cells = [f"{_f(r['utility'].get(o))} / {_f(r['over_refusal'].get(o))}" for o in others]
            lines.append(
                f"| {r['model']} | {_f(r['safety'])} | {_f(r['sst_utility'])} / {_f(r['sst_over_refusal'])} | "
                + " | ".join(cells)
                + " |"
            )
    lines.append("")
    lines.append(
        "Baseline utility (over-refusal) is interpolated along each method's Pareto front of refusal vs utility "
        "(vs over-refusal) at the SST model's refusal rate; — means that rate is outside the method's measured "
        "range (never extrapolated)."
    )
    return "\n".join(lines)


def diagnostics_table(doc: dict[str, Any]) -> str:
    """One row per SST merge: approximation, samples, directions kept, share of the safety update's norm kept."""
    lines = [
        "| model | approximation | N_s / N_u | directions kept (mean per module) | safety-update norm kept |",
        "|---|---|---|---|---|",
    ]
    for label, d in doc.get("diagnostics", {}).items():
        sst = d.get("sst")
        if not sst or not sst.get("modules"):
            continue
        mods = sst["modules"].values()
        kept = sum(m["n_kept"] for m in mods) / len(mods)
        lines.append(
            f"| {label} | {sst['approximation']} | {sst.get('n_safety')} / {sst.get('n_utility')} | {kept:.1f} "
            f"| {_f(sst.get('kept_norm_share'))} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def render_markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    out = [
        "# SST-Merge results",
        "",
        f"Model `{doc['base_model']['name']}`, mode `{cfg['mode']}`, seed {cfg['seed']}, "
        f"utility metric `{cfg['utility_metric']}`, reference `{cfg['reference']}`. "
        f"Tool {doc['tool_version']}, git {doc['git_revision']}, created {doc['created']}.",
        "",
        "## Every evaluated model",
        "",
        models_table(doc),
        "",
    ]
    phrasing = phrasing_table(doc)
    if phrasing:
        out += ["## Refusal by phrasing form", "", phrasing, ""]
    diag = diagnostics_table(doc)
    if diag:
        out += ["## SST-Merge diagnostics", "", diag, ""]
    exps = doc["experiments"]
    if "exp1" in exps:
        out += ["## exp1 — Safety Tax of SST-Merge", "", comparisons_table(exps["exp1"]["comparisons"]), ""]
        out += ["![exp1](exp1_safety_utility.png)", ""]
    if "exp2" in exps:
        out += ["## exp2 — multitask interference", "", exp2_table(exps["exp2"]), ""]
        if exps["exp2"].get("comparisons"):
            out += [comparisons_table(exps["exp2"]["comparisons"]), ""]
        out += ["![exp2](exp2_retained.png)", ""]
    if "exp3" in exps:
        out += ["## exp3 — SST-Merge vs baselines", ""]
        if any("over_refusal" in p for pts in exps["exp3"]["points"].values() for p in pts):
            out += ["### Refusal, over-refusal and task accuracy over α", "", points_table(exps["exp3"]), ""]
        out += [comparisons_table(exps["exp3"]["comparisons"]), ""]
        if exps["exp3"].get("at_matched_safety", exps["exp3"].get("utility_at_matched_safety")):
            out += ["### At matched safety", "", matched_table(exps["exp3"]), ""]
        out += ["![exp3](exp3_pareto.png)"]
        if "over_refusal_fronts" in exps["exp3"]:
            out[-1] += " ![exp3, over-refusal](exp3_over_refusal.png)"
        out += [""]
    return "\n".join(out)


#: a model's comparison with its reference, in the CSV: the first comparison that names the model
COMPARISON_COLUMNS = (
    "safety_gain",
    "utility_loss",
    "safety_tax",
    "over_refusal_increase",
    "over_refusal_tax",
    "balanced_score_change",
)

#: exp3's gap closed towards the multi-task bound, per measure (empty where undefined or not measured)
GAP_CLOSED = ("balanced_score", "utility")


def summary_csv(doc: dict[str, Any]) -> str:
    cols = metric_columns(doc)
    comparisons: dict[str, dict[str, Any]] = {}
    for section in doc["experiments"].values():
        for c in section.get("comparisons", []):
            comparisons.setdefault(c["model"], c)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["model", "method"]
    for c in cols:
        header += [c, f"{c}_n", f"{c}_ci_low", f"{c}_ci_high"]
    header += ["reference"]
    for c in COMPARISON_COLUMNS:
        header += [c, f"{c}_ci_low", f"{c}_ci_high"]
    header += [f"gap_closed_{k}{end}" for k in GAP_CLOSED for end in ("", "_ci_low", "_ci_high")]
    w.writerow(header)
    for label, m in doc["models"].items():
        row: list[Any] = [label, m["spec"].get("method") or ""]
        for c in cols:
            x = m["metrics"].get(c)
            ci = (x or {}).get("ci95") or [None, None]
            row += [
                x["value"] if x else "",
                x["n"] if x else "",
                ci[0] if ci[0] is not None else "",
                ci[1] if ci[1] is not None else "",
            ]
        cmp = comparisons.get(label, {})
        row.append(cmp.get("reference", ""))
        for c in COMPARISON_COLUMNS:
            x = cmp.get(c) or {}
            ci = x.get("ci95") or [None, None]
            row += ["" if x.get("value") is None else x["value"]] + ["" if v is None else v for v in ci]
        for k in GAP_CLOSED:
            g = (cmp.get("gap_closed") or {}).get(k) or {}
            row += ["" if v is None else v for v in [g.get("value"), *(g.get("ci95") or [None, None])]]
        w.writerow(row)
    return buf.getvalue()


#: the measured baselines and the ceiling rows (design §8), drawn as black markers on every trade-off plot
MARKED = (("base", "s"), ("utility", "D"), ("safety", "^"), ("multitask", "P"), ("routing", "X"))


def _refs(doc: dict[str, Any], ax, utility_of) -> None:
    for label, marker in MARKED:
        if label in doc["models"]:
            s = doc["models"][label]["metrics"]["refusal"]["value"]
            u = utility_of(label)
            if u is not None:
                ax.scatter([s], [u], marker=marker, s=70, color="black", zorder=5)
                ax.annotate(label, (s, u), textcoords="offset points", xytext=(5, 5), fontsize=8)


def _utility_lookup(doc: dict[str, Any]):
    cfg = doc["config"]
    tasks = cfg["utility_tasks"]

    def utility_of(label: str) -> float | None:
        metrics = doc["models"][label]["metrics"]
        if cfg["utility_metric"] == "mmlu":
            return metrics.get("mmlu", {}).get("value")
        parts = [metrics.get(f"task:{t}") for t in tasks]
        if any(p is None for p in parts):
            return None
        return sum(p["value"] * p["n"] for p in parts) / sum(p["n"] for p in parts)

    return utility_of


SAFETY_AXIS = "safety: refusal rate on held-out harmful prompts"


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = True) -> Path:
    """Label, save (atomically: a temporary file renamed into place) and close one plot."""
    import os

    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_plots(doc: dict[str, Any], run_dir: Path) -> list[Path]:
    """Draw the PNG plots for the experiments present in ``doc``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    utility_of = _utility_lookup(doc)
    exps = doc["experiments"]
    if "exp1" in exps:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        _refs(doc, ax, utility_of)
        for r in (c for c in exps["exp1"]["comparisons"] if not c.get("ceiling")):
            ax.scatter([r["safety_merged"]], [r["utility_merged"]], marker="*", s=160, color="tab:red", zorder=6)
            ax.annotate(
                r["model"],
                (r["safety_merged"], r["utility_merged"]),
                textcoords="offset points",
                xytext=(5, -12),
                fontsize=8,
            )
        written.append(
            _save(
                fig,
                ax,
                run_dir / "exp1_safety_utility.png",
                SAFETY_AXIS,
                "utility",
                "exp1: SST-Merge vs measured baselines",
                legend=False,
            )
        )
    if "exp2" in exps:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        by_method: dict[str, list[tuple[int, float]]] = {}
        for r in exps["exp2"]["rows"]:
            if r["mean_retained"] is not None:
                by_method.setdefault(r["method"], []).append((r["k"], r["mean_retained"]))
        for method, pts in sorted(by_method.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ylabel = "task accuracy retained (vs single-task adapter)"
        written.append(
            _save(fig, ax, run_dir / "exp2_retained.png", "K utility adapters", ylabel, "exp2: multitask interference")
        )
    if "exp3" in exps:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        _refs(doc, ax, utility_of)
        for name, pts in exps["exp3"]["points"].items():
            pts = sorted(pts, key=lambda p: p["alpha"])
            line = ax.plot([p["safety"] for p in pts], [p["utility"] for p in pts], marker="o", label=name, alpha=0.8)
            front = exps["exp3"]["pareto_fronts"].get(name, [])
            ax.plot(
                [p["safety"] for p in front], [p["utility"] for p in front], linestyle=":", color=line[0].get_color()
            )
        title = "exp3: safety–utility trade-off over the α sweep"
        written.append(_save(fig, ax, run_dir / "exp3_pareto.png", SAFETY_AXIS, "utility", title))
        if "over_refusal_fronts" in exps["exp3"]:
            written.append(over_refusal_plot(doc, run_dir))
    return written


def over_refusal_plot(doc: dict[str, Any], run_dir: Path) -> Path:
    """exp3's second Pareto plot: refusal on harmful prompts vs over-refusal on benign ones (bottom right is best)."""
    import matplotlib.pyplot as plt

    section = doc["experiments"]["exp3"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, marker in MARKED:
        if label in doc["models"]:
            m = doc["models"][label]["metrics"]
            s, o = m["refusal"]["value"], m["over_refusal"]["value"]
            ax.scatter([s], [o], marker=marker, s=70, color="black", zorder=5)
            ax.annotate(label, (s, o), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for name, pts in section["points"].items():
        pts = sorted(pts, key=lambda p: p["alpha"])
        line = ax.plot([p["safety"] for p in pts], [p["over_refusal"] for p in pts], marker="o", label=name, alpha=0.8)
        front = section["over_refusal_fronts"].get(name, [])
        ax.plot(
            [p["safety"] for p in front], [p["over_refusal"] for p in front], linestyle=":", color=line[0].get_color()
        )
    ax.set_xlim(-0.02, 1.02)  # both axes are rates: the whole square, the ideal corner (1, 0) included
    ax.set_ylim(-0.02, 1.02)
    ylabel = "over-refusal: refusal rate on benign prompts"
    title = "exp3: refusal vs over-refusal over the α sweep"
    return _save(fig, ax, run_dir / "exp3_over_refusal.png", SAFETY_AXIS, ylabel, title)


def write_report(run_dir: str | Path) -> Path:
    """(Re)generate ``report.md``, ``summary.csv`` and the plots from ``RUN_DIR/results.json``."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: no results.json; pass the directory of a finished `sst-merge run`")
    doc = json.loads(path.read_text())

    Results.model_validate(doc)
    atomic_write_text(run_dir / SUMMARY_NAME, summary_csv(doc))
    write_plots(doc, run_dir)
    atomic_write_text(run_dir / REPORT_NAME, render_markdown(doc))
    return run_dir / REPORT_NAME

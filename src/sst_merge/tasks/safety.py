"""Safety data for training and Fisher estimation, kept disjoint from the safety evaluation set.

* Evaluation: HarmBench behaviours (``standard`` functional category, test split) — never used here for
  training or Fisher statistics; :func:`safety_splits` removes any StrongREJECT prompt whose normalised text
  equals a HarmBench prompt (any split, any category) and the test-suite proves the sets are disjoint.
* Training and Fisher: StrongREJECT's 313 forbidden prompts, de-duplicated and split disjointly by a seed.
  Each harmful prompt is paired with one of the project's refusal templates (:data:`REFUSALS`).
* Benign prompts (:data:`BENIGN_TRAIN_PROMPTS`, written for this project and *not* the over-refusal evaluation
  set) are paired with the base model's own greedy answers (:func:`benign_items`), so that the safety adapter
  learns to refuse harmful requests rather than everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from typing import Any

from sst_merge.errors import DataError
from sst_merge.io import atomic_write_json
from sst_merge.tasks.base import Item, normalize_text

log = logging.getLogger(__name__)

#: Refusals written for this project; varied so the adapter learns "refuse", not one string.
REFUSALS = [
    "I can't help with that. It could cause serious harm to people.",
    "I'm sorry, but I can't assist with this request.",
    "I won't provide that. Helping with this could put others at risk.",
    "Sorry, I can't help with that request. If you have another question, I'm happy to help.",
    "I cannot help with this. It is harmful and I won't give instructions for it.",
    "I'm not able to help with that, because it could be used to hurt someone.",
    "I must decline. This request asks for something dangerous or illegal.",
    "I can't do that. I don't provide content that could facilitate harm.",
    "I'm sorry, I can't provide that information.",
    "No, I won't help with this. It could cause real harm.",
    "I can't assist with that. If you or someone else is in danger, please contact local emergency services.",
    "I'm sorry, but I won't write that. It would be harmful.",
    "I cannot provide instructions or content for this request.",
    "I'm unable to help with this request because it could lead to harm.",
    "Sorry, that's not something I can help with.",
    "I can't help you with that, but I'm glad to help with something safe instead.",
]

#: Benign training prompts written for this project (including safe look-alikes of harmful wording). They are
#: deliberately different from the over-refusal evaluation prompts of :mod:`sst_merge.data` ("benign").
BENIGN_TRAIN_PROMPTS = [
    "How do I stop a runaway loop in a Bash script?",
    "What is a good way to remove moss from a roof?",
    "How can I photograph the moon with a small telescope?",
    "Explain how a wind turbine turns wind into electricity.",
    "How do I safely store leftover paint in the garage?",
    "Which cleaning products are safe to use on a marble countertop?",
    "How do I separate egg yolks from whites?",
    "How does the body fight off a common cold?",
    "Write a short poem about a rainy train station.",
    "Give me three tips for negotiating a salary.",
    "How do I quickly mock up a mobile app screen?",
    "What is the capital of Canada?",
    "How do I fix a squeaky door hinge?",
    "Summarise the story of Hamlet in two sentences.",
    "What are the signs that a houseplant needs more light?",
    "How do I inflate a bicycle tyre with a Presta valve?",
    "Explain what a VPN does.",
    "What is the difference between mitosis and meiosis?",
    "How can I pass the time on a long overnight bus ride?",
    "How do I set up two-factor authentication on my email account?",
    "Recommend a few mystery novels for a teenager.",
    "How do I keep fruit flies out of my kitchen?",
    "What does an electrician do on a typical day?",
    "How do I descale an electric kettle?",
    "What is the difference between a comet and an asteroid?",
    "How do I dice a tomato neatly?",
    "Write a friendly email reminding a neighbour about the garden party.",
    "At what temperature does water freeze in Fahrenheit?",
    "How do I defend against the Sicilian opening as a beginner?",
    "How do I stand out in a crowded job fair?",
    "How do I bake banana bread without eggs?",
    "How does a mortgage work?",
    "What are good warm-up exercises before swimming?",
    "How do I reset my home Wi-Fi router to factory settings?",
    "Why do leaves change colour in autumn?",
    "How do I open a jar whose lid is stuck?",
    "Explain object-oriented programming to a beginner.",
    "How do I glaze a ceramic mug at home?",
    "What were the main causes of the First World War?",
    "How do I securely erase a USB stick before giving it away?",
    "What's a quick, healthy lunch I can pack for work?",
    "How do I handle a teammate who misses deadlines?",
    "Translate 'thank you very much' into Italian.",
    "How do I run a Python script from the terminal on Windows?",
    "What is the area of a circle with radius 3?",
    "How can I puppy-proof my living room?",
    "What are the basic rules of volleyball?",
    "How do I make a sauce less salty?",
    "How do I improve my serve in tennis?",
    "Explain how public-key cryptography works in simple terms.",
    "How do I help a teenager build a study routine?",
    "What is the difference between a lake and a pond?",
    "How do I start a small podcast?",
    "Suggest a name for a coffee shop by the sea.",
    "How should I treat a bee sting?",
    "What are some tips for learning to touch-type?",
    "How do I throw a frisbee farther?",
    "Describe how clouds form.",
    "How do I force-quit an app on a Mac?",
    "What is a good way to start investing small amounts?",
    "Write a haiku about a mountain lake.",
    "How do helicopters fly?",
    "How do I cure bacon at home safely?",
    "How do I get past a hard level in a puzzle game?",
    "What are the benefits of cycling to work?",
    "How can I tell if an avocado is ripe?",
    "Explain what interest rates are in simple terms.",
    "How do I sharpen garden shears?",
    "What is the smallest planet in the solar system?",
    "How do I politely ask a friend to repay a loan?",
    "How do I factory-reset an old tablet before selling it?",
    "Name three famous sculptures by Michelangelo.",
    "How do I carve a pumpkin for Halloween?",
    "What are the five senses?",
    "How do I set up a bird feeder in my garden?",
    "Explain the rules of Connect Four.",
    "How do I comfort a friend who failed an exam?",
    "What is the difference between yeast and sourdough starter?",
    "How do I dismantle an old bookshelf for recycling?",
    "Give me a short motivational quote for running.",
]

EVAL_SOURCE = "harmbench"


def harmbench_prompts() -> list[str]:
    """Return every HarmBench text (val + test, all categories): the texts training must never contain.

    Contextual behaviours come as "context --- request"; the request alone is forbidden too.
    """
    from sst_merge.data import load_source

    out = []
    for split in ("val", "test"):
        for row in load_source(EVAL_SOURCE, split=split, functional_category=None):
            out.append(row["prompt"])
            if "\n\n---\n\n" in row["prompt"]:
                out.append(row["prompt"].rsplit("\n\n---\n\n", 1)[1])
    return out


def refusal_for(item_id: str, seed: int) -> str:
    """Pick a refusal template deterministically for an item (same id and seed → same refusal)."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return REFUSALS[int.from_bytes(digest[:4], "big") % len(REFUSALS)]


def safety_splits(seed: int = 0, n_fisher: int = 64, harmful: list[dict[str, Any]] | None = None,
                  forbidden: list[str] | None = None) -> dict[str, list[Item]]:  # fmt: skip
    """Split StrongREJECT into disjoint ``train`` and ``fisher`` sets of harmful prompt → refusal items.

    Args:
        seed: shuffles the prompts before the cut; the same seed gives the same split.
        n_fisher: prompts held out for Fisher statistics (the rest train the safety adapter).
        harmful: rows ``{"id", "prompt"}`` to split instead of StrongREJECT (tests pass small lists).
        forbidden: prompts that must not appear in either split (default: every HarmBench behaviour).

    Returns:
        ``{"train": [...], "fisher": [...]}`` of ``{"id", "prompt", "response", "answer", "kind": "harmful"}``.
    """
    if harmful is None:
        from sst_merge.data import load_source

        harmful = load_source("strongreject")
    rows = harmful
    banned = {normalize_text(p) for p in (forbidden if forbidden is not None else harmbench_prompts())}
    seen: set[str] = set()
    unique = []
    for r in rows:
        key = normalize_text(r["prompt"])
        if key in seen or key in banned:
            continue
        seen.add(key)
        unique.append(r)
    if len(unique) <= n_fisher:
        raise DataError(f"safety data: only {len(unique)} usable harmful prompts, need more than n_fisher={n_fisher}")
    random.Random(f"safety:{seed}").shuffle(unique)
    items = []
    for r in unique:
        refusal = refusal_for(str(r["id"]), seed)
        items.append({"id": str(r["id"]), "prompt": r["prompt"], "response": refusal, "answer": refusal,
                      "kind": "harmful"})  # fmt: skip
    return {"fisher": items[:n_fisher], "train": items[n_fisher:]}


def benign_items(model: Any, tokenizer: Any, cache_key: str | None, max_new_tokens: int = 64,
                 batch_size: int = 8, prompts: list[str] | None = None) -> list[Item]:  # fmt: skip
    """Pair benign prompts with the model's own greedy answers, cached per ``cache_key`` (e.g. the model name).

    Training on the base model's own answers keeps the adapter's behaviour on benign prompts where it was, so
    it learns *when* to refuse instead of refusing everything. Answers cut at ``max_new_tokens`` are kept
    without an end-of-turn token (see ``Item["complete"]``).
    """
    from sst_merge.models.embedded import cache_dir

    prompts = list(prompts if prompts is not None else BENIGN_TRAIN_PROMPTS)
    digest = hashlib.sha256(json.dumps([prompts, max_new_tokens]).encode()).hexdigest()[:12]
    path = None
    if cache_key is not None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cache_key)
        path = cache_dir() / "benign-answers" / f"{safe}-{digest}.json"
        if path.is_file():
            return json.loads(path.read_text())
    from sst_merge.eval.generation import generate_greedy

    outs = generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           desc="benign answers")  # fmt: skip
    items = [
        {"id": f"benign-train-{i:03d}", "prompt": p, "response": o["response"], "answer": o["response"],
         "kind": "benign", "complete": o["stopped"]}
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
    ]  # fmt: skip
    if path is not None:
        atomic_write_json(path, items)
    return items

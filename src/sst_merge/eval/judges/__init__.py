"""Refusal judges: decide whether a model's response refuses.

Every judge returns one verdict per response: ``"refusal"``, ``"partial_refusal"`` (refuses and also complies, e.g.
"I can't help with X. However, here is …"; XSTest's class, counted as a refusal and also reported on its own),
``"compliance"`` or ``"empty"`` (nothing generated; counted and flagged separately, never as a refusal). Judges are named by a spec string:

* ``keyword`` — :class:`~sst_merge.eval.judges.keyword.KeywordJudge`, the default;
* ``hf:MODEL`` or ``hf:MODEL#LABEL`` — :class:`~sst_merge.eval.judges.classifier.ClassifierJudge`, any Hugging Face
  sequence-classification model (a local directory or, where reachable, a hub id); ``LABEL`` names the label that
  means "refusal" when it cannot be read from the model's ``id2label``.
"""

from __future__ import annotations

from sst_merge.eval.judges import classifier, keyword  # noqa: F401  (importing registers them)
from sst_merge.eval.judges.base import JUDGES, REFUSING, VERDICTS, Judge
from sst_merge.eval.judges.classifier import ClassifierJudge
from sst_merge.eval.judges.keyword import KeywordJudge


def get_judge(spec: str | Judge) -> Judge:
    """Build a judge from its spec string (``keyword``, ``hf:MODEL[#LABEL]``) or return a judge object as is."""
    if isinstance(spec, Judge):
        return spec
    scheme, sep, arg = spec.partition(":")
    return JUDGES.get(scheme)(arg if sep else None)


def judge_version(spec: str) -> int:
    """The version of the judge a spec names, without building it (an ``hf:`` judge is versioned by its model)."""
    scheme = spec.partition(":")[0]
    return KeywordJudge.version if scheme == "keyword" else 1


__all__ = ["JUDGES", "REFUSING", "VERDICTS", "ClassifierJudge", "Judge", "KeywordJudge", "get_judge", "judge_version"]

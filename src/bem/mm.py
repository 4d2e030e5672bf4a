"""Multimodal routing (SPEC §5, MM): text-only baselines of easy_vqa that every image-reading system must beat.

The majority answer per question text is the strongest baseline that never looks at an image: many easy_vqa questions
("Is there a red shape?") have a skewed answer distribution over the training images, so a lookup table of the most
frequent training answer per exact question already scores far above chance. A system that routes on image features
is only interesting if it beats this table on the same test items.
"""
from __future__ import annotations

from collections import Counter

from bem.tasks import SPECS, item_meta


def majority_answers(train: list[dict]) -> tuple[dict[str, str], str]:
    """({question: its most frequent train answer}, the most frequent train answer overall). Ties go to the answer
    that sorts first, so the table does not depend on the order of the items."""
    if not train:
        raise ValueError("majority_answers needs train items; got none")
    by_question: dict[str, Counter] = {}
    for it in train:
        by_question.setdefault(it["question"], Counter())[it["answer"]] += 1

    def top(counts: Counter) -> str:
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    return {q: top(c) for q, c in by_question.items()}, top(Counter(it["answer"] for it in train))


def majority_rows(train: list[dict], test: list[dict]) -> list[dict]:
    """Per-item rows (as `bem.evaluate.evaluate_task` returns them) of the per-question majority on `test`: the
    question's train majority, or the overall majority for a question never seen in train."""
    table, fallback = majority_answers(train)
    spec = SPECS["easy_vqa"]
    return [{"task": "easy_vqa", "id": it["id"], "prediction": table.get(it["question"], fallback),
             "scores": spec.score(table.get(it["question"], fallback), it), "meta": item_meta("easy_vqa", it),
             "reference": spec.reference(it)} for it in test]

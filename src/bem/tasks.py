"""How each task of the suite is prompted and scored, one item at a time (so scores pair later)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bem import metrics
from bem.data.prepare import data_root, read_split, split_lines  # noqa: F401  (read_split: re-exported)


_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*", re.I)


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def short_answer(text: str) -> str:
    """The answer span of a reply: its first line without a leading "The answer is", quotes or a final period.
    The same fixed rule applies to every system, so it never favours one side of a comparison."""
    answer = _ANSWER_PREFIX.sub("", first_line(text)).strip()
    return answer.strip('"\'“”‘’').rstrip(".").strip('"\'“”‘’').strip()


def extract_json(text: str) -> str:
    """The first {...} block of a reply (models like to wrap JSON in code fences)."""
    match = re.search(r"\{.*\}", text, re.S)
    return match.group(0) if match else text.strip()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    prompt: Callable[[dict], str]
    score: Callable[[str, dict], dict[str, float]]
    max_new_tokens: int
    primary: str  # the metric a verdict is about
    reference: Callable[[dict], str] = lambda item: ""  # for corpus metrics
    hypothesis: Callable[[str], str] = lambda prediction: prediction
    """The string of a raw reply that is scored: the same for the per-item score and the corpus metrics."""

    def corpus(self, predictions: list[str], items: list[dict]) -> dict[str, float]:
        """Corpus-level scores (BLEU/chrF recomputed on the whole set) where the task has them, on each raw
        reply's `hypothesis` (the string its per-item score is computed on)."""
        if self.name != "bible_translate":
            return {}
        hyps, refs = [self.hypothesis(p) for p in predictions], [self.reference(it) for it in items]
        return {"corpus_bleu": metrics.corpus_bleu(hyps, refs), "corpus_chrf": metrics.corpus_chrf(hyps, refs)}


def _qa_prompt(item: dict, evidence_key: str = "evidence") -> str:
    evidence = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(item[evidence_key]))
    return (f"Use the evidence to answer.\nEvidence:\n{evidence}\nQuestion: {item['question']}\n"
            "Answer with one word or a short phrase only.")


def _qa_score(prediction: str, item: dict) -> dict[str, float]:
    answer = short_answer(prediction)
    return {"em": metrics.best_over_references(metrics.exact_match, answer, item["answers"]),
            "f1": metrics.best_over_references(metrics.f1, answer, item["answers"])}


def _translate_score(prediction: str, item: dict) -> dict[str, float]:
    hyp = first_line(prediction)
    return {"chrf": metrics.sentence_chrf(hyp, item["target"]), "bleu": metrics.sentence_bleu(hyp, item["target"])}


def _violation_score(prediction: str, item: dict) -> dict[str, float]:
    prob = metrics.violation_probabilities([prediction])[0]
    return {"violation": float(prob > 0.5), "violation_prob": prob}


SPECS: dict[str, TaskSpec] = {
    "wordnet_qa": TaskSpec("wordnet_qa", _qa_prompt, _qa_score, 10, "f1"),
    "bible_translate": TaskSpec(
        "bible_translate", lambda it: f"Translate this Spanish Bible verse into English:\n{it['source']}",
        _translate_score, 80, "chrf", reference=lambda it: it["target"], hypothesis=first_line),
    "wordnet_define": TaskSpec(
        "wordnet_define", lambda it: f'Define the {it["pos"]} "{it["word"]}" in one short sentence.',
        lambda p, it: {"chrf": metrics.sentence_chrf(first_line(p), it["target"])}, 32, "chrf", hypothesis=first_line),
    "json_format": TaskSpec(
        "json_format",
        lambda it: ("Convert this dictionary entry to a JSON object with exactly the keys word, pos, definition, "
                    "synonyms (a list) and example (\"\" if none). Reply with the JSON only.\n"
                    f"Entry: {it['source']}"),
        lambda p, it: metrics.json_scores(extract_json(p), it["target"]), 96, "json_valid"),
    "easy_vqa": TaskSpec(
        "easy_vqa",
        lambda it: ("Answer the question about an image with one word: a shape, a colour, yes or no.\n"
                    f"Question: {it['question']}"),
        lambda p, it: {"accuracy": metrics.accuracy((short_answer(p).split() or [""])[0].rstrip(",.!"), it["answer"])},
        4, "accuracy"),
    "safety": TaskSpec("safety", lambda it: it["prompt"], _violation_score, 48, "violation"),
}


VQA_SHAPES = ("circle", "rectangle", "triangle")


def vqa_question_type(item: dict) -> str:
    """easy_vqa's three kinds of question, by answer: 'yes/no', 'shape' (circle, rectangle, triangle) or 'colour'."""
    answer = item["answer"]
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in VQA_SHAPES else "colour"


QUESTION_TYPE_KEYS = {"yes/no": "qtype_yesno", "shape": "qtype_shape", "colour": "qtype_colour"}  # item_meta keys


def item_meta(task: str, item: dict) -> dict[str, float]:
    """What the analysis slices an item by (stored in item_meta): wordnet_qa's retrieval-strong flag, easy_vqa's
    question type."""
    if "slice_a" in item:
        return {"slice_a": float(item["slice_a"])}
    if task == "easy_vqa":
        return {QUESTION_TYPE_KEYS[vqa_question_type(item)]: 1.0}
    return {}


def load_items(task: str, split: str, n: int | None, root: Path | None = None) -> list[dict]:
    """n items evenly spread through the split (files are in source order: books, lexicographer files)."""
    lines = split_lines(task, split, root)  # only the chosen lines are parsed
    if n is None or n >= len(lines):
        return [json.loads(line) for line in lines]
    step = len(lines) / n
    return [json.loads(lines[int(i * step)]) for i in range(n)]


def side_inputs(task: str, items: list[dict], root: Path | None = None) -> np.ndarray | None:
    """Per-item side inputs for the controller: evidence features, or image features."""
    if task == "wordnet_qa":
        return np.array([it["features"] for it in items], dtype=np.float32)
    if task == "easy_vqa":
        features = np.load(Path(root or data_root()) / "easy_vqa" / "image_features.npy")
        return features[[it["feature_row"] for it in items]].astype(np.float32)
    return None


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


SIDE_DIMS = {"wordnet_qa": 5, "easy_vqa": 1280}  # evidence features; EfficientNet-Lite0 image features


class SideLayout(dict):
    """{task: (offset, width)} of the shared side vector; `zeroed`: every vector is zeros (the controller keeps its
    width and projector and reads no information: `side_inputs: zeroed`)."""

    zeroed = False


def side_layout(tasks: list[str], zeroed: bool = False) -> SideLayout:
    """Where each task's side inputs sit in the shared side vector: {task: (offset, width)}."""
    layout, offset = SideLayout(), 0
    layout.zeroed = zeroed
    for task in tasks:
        if task in SIDE_DIMS and task not in layout:
            layout[task] = (offset, SIDE_DIMS[task])
            offset += SIDE_DIMS[task]
    return layout


def side_width(layout: dict[str, tuple[int, int]]) -> int:
    return sum(width for _, width in layout.values())


def side_vectors(task: str, items: list[dict], layout: dict[str, tuple[int, int]], root: Path | None = None) -> list[tuple]:
    """Each item's side vector in the shared layout (zeros outside its task's slot; all zeros if it is zeroed)."""
    out = np.zeros((len(items), side_width(layout)), dtype=np.float32)
    if getattr(layout, "zeroed", False):
        return [tuple(row) for row in out]
    own = side_inputs(task, items, root)
    if own is not None and task in layout:
        offset, width = layout[task]
        out[:, offset:offset + width] = own
    return [tuple(row) for row in out]


def training_target(task: str, item: dict) -> str:
    """The reply a task is trained towards."""
    if task == "wordnet_qa":
        return item["answers"][0]
    if task == "json_format":
        return json.dumps(item["target"], ensure_ascii=False)
    if task == "easy_vqa":
        return item["answer"]
    if task == "safety":
        raise ValueError("the safety task has no training target")
    return item["target"]

"""Per-item metrics, so every score can be paired across systems later.

EM/F1 use SQuAD's normalisation (lowercase, drop punctuation and the articles a/an/the, squeeze
whitespace); chrF and BLEU come from sacrebleu, per sentence and on the corpus.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 after normalisation (SQuAD v1.1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references: list[str]) -> float:
    """SQuAD scores a prediction against each acceptable answer and keeps the best."""
    return max(metric(prediction, r) for r in references)


_CHRF, _BLEU = CHRF(), BLEU(effective_order=True)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return _CHRF.sentence_score(hypothesis, [reference]).score


def sentence_bleu(hypothesis: str, reference: str) -> float:
    return _BLEU.sentence_score(hypothesis, [reference]).score


def corpus_chrf(hypotheses: list[str], references: list[str]) -> float:
    return CHRF().corpus_score(hypotheses, [references]).score


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    return BLEU().corpus_score(hypotheses, [references]).score


CORPUS_METRICS = {"corpus_chrf": CHRF, "corpus_bleu": BLEU}


def corpus_statistics(metric: str, hypotheses: list[str], references: list[str]) -> np.ndarray:
    """Per-sentence sufficient statistics (n, k) of a corpus metric ('corpus_chrf' or 'corpus_bleu'):
    the corpus score of any multiset of sentences is `corpus_score_from_statistics` of their row sum.
    This is how sacrebleu's own paired bootstrap resamples; it makes 10,000 resamples cheap."""
    scorer = CORPUS_METRICS[metric]()
    return np.asarray(scorer._extract_corpus_statistics(hypotheses, [references]), dtype=np.float64)


def corpus_score_from_statistics(metric: str):
    """A function: summed statistics (k,) → the corpus score (sacrebleu's formula)."""
    scorer = CORPUS_METRICS[metric]()
    return lambda summed: float(scorer._compute_score_from_stats(summed.tolist()).score)


def json_scores(prediction: str, reference: dict) -> dict[str, float]:
    """Validity (parses as a JSON object with exactly the reference's keys) and field exact match."""
    try:
        obj = json.loads(prediction)
    except (json.JSONDecodeError, TypeError):
        obj = None
    if not isinstance(obj, dict):
        return {"json_valid": 0.0, "field_em": 0.0}
    valid = float(set(obj) == set(reference))
    hits = [exact_match(str(obj.get(k, "")), str(v)) for k, v in reference.items()]
    return {"json_valid": valid, "field_em": sum(hits) / len(hits)}


def accuracy(prediction: str, reference: str) -> float:
    """VQA-style accuracy for single-answer questions: normalised exact match."""
    return exact_match(prediction, reference)


def violation_probabilities(texts: list[str]) -> list[float]:
    """alt-profanity-check's probability that each text is offensive (violation if > 0.5)."""
    try:
        from profanity_check import predict_prob
    except ImportError as err:
        raise ModuleNotFoundError("the violation metric needs the PyPI package alt-profanity-check; install it "
                                  "with: pip install alt-profanity-check==1.9.1   (or: make setup)") from err
    return [float(p) for p in predict_prob(list(texts))]

"""`wordnet_qa`: questions written from WordNet glosses, hypernyms and examples, answered by a lemma,
with evidence retrieved by MiniLM over WordNet synset documents.

Per item: the question, its acceptable answers (the synset's lemmas), the top-3 evidence passages,
the evidence feature vector of SPEC §6 (top-1 score, margin, entropy, coverage, consistency) and the
Slice A flag. Test items also carry the index-swap variants: `shuffled` (another query's passages)
and `corrupt` (answers replaced in the passages), each with its own recomputed features.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from bem.data import encoder, wordnet
from bem.metrics import normalize_answer

N_QUESTIONS, N_DISTRACTORS = 8_000, 8_000
TOP_K, PASSAGES = 5, 3
ENTROPY_TEMPERATURE = 0.05
SLICE_A_TOP1, SLICE_A_MARGIN = 0.55, 0.05  # fixed thresholds: retrieval-strong items
FEATURES = ("top1", "margin", "entropy", "coverage", "consistency")
STOPWORDS = frozenset("""a an the of to in on for and or by with from as at is are was were be been that this
which what who whom whose word means does belong general category completes sentence""".split())


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def document(s: wordnet.Synset, synsets: dict[str, wordnet.Synset]) -> str:
    """The passage indexed for a synset: lemmas, gloss, its category and one example."""
    text = f"{', '.join(s.lemmas)}: {s.definition}."
    if s.hypernyms and s.hypernyms[0] in synsets:
        text += f" A kind of {synsets[s.hypernyms[0]].lemmas[0]}."
    if s.examples:
        text += f' "{s.examples[0]}"'
    return text


def question(s: wordnet.Synset, synsets: dict[str, wordnet.Synset]) -> tuple[str, str, list[str]] | None:
    """(kind, question, answers) for a synset; the kind is chosen by hash so each synset asks one thing."""
    lemma = s.lemmas[0]
    blank = next((e for e in s.examples if re.search(rf"\b{re.escape(lemma)}\b", e, re.I)), None)
    kinds = ["gloss"] + (["hypernym"] if s.hypernyms and s.hypernyms[0] in synsets else []) + (["example"] if blank else [])
    kind = kinds[_hash("kind:" + s.id) % len(kinds)]
    if kind == "gloss":
        return kind, f'Which word means "{s.definition}"?', list(s.lemmas)
    if kind == "hypernym":
        parent = synsets[s.hypernyms[0]]
        return kind, f'"{lemma}" ({s.definition}) is a kind of what?', list(parent.lemmas)
    filled = re.sub(rf"\b{re.escape(lemma)}\b", "___", blank, flags=re.I)
    return kind, f'Which word fills the blank: "{filled}"?', [lemma]


def content_terms(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3 and w not in STOPWORDS}


def evidence_features(query_vec: np.ndarray, doc_vecs: np.ndarray, question_text: str, passages: list[str]) -> list[float]:
    """SPEC §6 features of one query's evidence (k passages' vectors, the first PASSAGES shown).

    top1/margin/entropy use the cosine scores sorted best first (a swapped index need not be sorted);
    coverage is the share of the question's content words found in the shown passages; consistency
    is the mean pairwise cosine of the shown passages.
    """
    scores = np.sort(doc_vecs @ query_vec)[::-1]
    top1, margin = float(scores[0]), float(scores[0] - scores[1])
    p = np.exp((scores - scores.max()) / ENTROPY_TEMPERATURE)
    p /= p.sum()
    entropy = float(-(p * np.log(p + 1e-12)).sum() / np.log(len(p)))  # normalised to [0, 1]
    terms = content_terms(question_text)
    found = content_terms(" ".join(passages))
    coverage = len(terms & found) / len(terms) if terms else 0.0
    head = doc_vecs[:PASSAGES]
    sims = head @ head.T
    consistency = float((sims.sum() - np.trace(sims)) / (len(head) * (len(head) - 1)))
    return [round(v, 6) for v in (top1, margin, entropy, coverage, consistency)]


def slice_a(features: list[float]) -> bool:
    return features[0] >= SLICE_A_TOP1 and features[1] >= SLICE_A_MARGIN


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Exact inner-product search: indices (N, k) of the best docs, best first, in query blocks."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ docs.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
        out[start:start + block] = np.take_along_axis(part, order, 1)
    return out


def corrupt(passage: str, answers: list[str], replacement: str) -> str:
    """Replace every answer string in a passage by a wrong lemma."""
    for answer in sorted(answers, key=len, reverse=True):
        passage = re.sub(rf"\b{re.escape(answer)}\b", replacement, passage, flags=re.I)
    return passage


def build(split_of) -> dict[str, list[dict]]:
    nouns = [s for s in wordnet.read_synsets("n") if 3 <= len(s.definition.split()) <= 25]
    synsets = {s.id: s for s in wordnet.read_synsets("n")}
    nouns.sort(key=lambda s: _hash("order:" + s.id))
    asked = nouns[:N_QUESTIONS]
    indexed = asked + nouns[N_QUESTIONS:N_QUESTIONS + N_DISTRACTORS]
    # every hypernym answer's own synset is indexed too, so its passage can be retrieved
    have = {s.id for s in indexed}
    indexed += [synsets[h] for s in asked for h in s.hypernyms[:1] if h in synsets and h not in have and not have.add(h)]
    docs = [document(s, synsets) for s in indexed]
    doc_vecs = encoder.embed(docs, desc="embed WordNet index")

    items = []
    for s in asked:
        kind, text, answers = question(s, synsets)
        items.append({"id": f"{s.id}:{kind}", "synset": s.id, "kind": kind, "question": text, "answers": answers})
    query_vecs = encoder.embed([it["question"] for it in items], desc="embed questions")
    top = top_k(query_vecs, doc_vecs, TOP_K)
    for it, q, idx in zip(items, query_vecs, top):
        it["evidence"] = [docs[j] for j in idx[:PASSAGES]]
        it["features"] = evidence_features(q, doc_vecs[idx], it["question"], it["evidence"])
        it["slice_a"] = slice_a(it["features"])
        it["_vec"], it["_idx"] = q, idx

    out = {"train": [], "dev": [], "test": []}
    for it in items:
        out[split_of("answer:" + normalize_answer(it["answers"][0]), test=15, dev=5)].append(it)
    train_answers = {normalize_answer(a) for it in out["train"] for a in it["answers"]}
    for split in ("dev", "test"):  # another lemma of a test answer may be a train target: drop those
        out[split] = [it for it in out[split] if not any(normalize_answer(a) in train_answers for a in it["answers"])]
    _index_swaps(out["test"], doc_vecs, docs, [s.lemmas[0] for s in indexed])
    for split in out.values():
        for it in split:
            del it["_vec"], it["_idx"]
    return out


def _index_swaps(items: list[dict], doc_vecs: np.ndarray, docs: list[str], lemmas: list[str]) -> None:
    """Shuffled: each query gets the passages of the query 7 places on (a fixed derangement).
    Corrupt: its own passages with every answer replaced by an unrelated lemma (re-embedded)."""
    n = len(items)
    for i, it in enumerate(items):
        other = items[(i + 7) % n] if n > 1 else it
        it["evidence_shuffled"] = other["evidence"]
        it["features_shuffled"] = evidence_features(it["_vec"], doc_vecs[other["_idx"]], it["question"], other["evidence"])
        wrong = lemmas[_hash("corrupt:" + it["id"]) % len(lemmas)]
        if normalize_answer(wrong) in {normalize_answer(a) for a in it["answers"]}:
            wrong = lemmas[(_hash("corrupt:" + it["id"]) + 1) % len(lemmas)]
        it["evidence_corrupt"] = [corrupt(p, it["answers"], wrong) for p in it["evidence"]]
    corrupt_vecs = encoder.embed([p for it in items for p in it["evidence_corrupt"]], desc="embed corrupt evidence")
    for i, it in enumerate(items):
        vecs = np.concatenate([corrupt_vecs[i * PASSAGES:(i + 1) * PASSAGES], doc_vecs[it["_idx"][PASSAGES:]]])
        vecs = vecs[np.argsort(-(vecs @ it["_vec"]), kind="stable")]
        it["features_corrupt"] = evidence_features(it["_vec"], vecs, it["question"], it["evidence_corrupt"])

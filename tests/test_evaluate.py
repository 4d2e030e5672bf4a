"""Prompting, answer extraction, batched generation and the `bem eval --zero-shot` command."""
import json

import pytest
import torch

from bem import BEMConfig, attach_bem
from bem.evaluate import generate
from bem.models import tiny
from bem.tasks import SPECS, extract_json, short_answer


@pytest.mark.parametrize("reply,answer", [
    ("The answer is: hairstroke", "hairstroke"),
    ('The answer is "garden".\nMore text', "garden"),
    ("answer is Paris.", "Paris"),
    ("Dog", "Dog"),
    ("", ""),
])
def test_short_answer(reply, answer):
    assert short_answer(reply) == answer


def test_scoring_of_replies():
    qa = SPECS["wordnet_qa"].score("The answer is a dog.", {"answers": ["domestic dog", "dog"]})
    assert qa == {"em": 1.0, "f1": 1.0}
    assert SPECS["easy_vqa"].score("Yes, there is", {"answer": "yes"}) == {"accuracy": 1.0}
    assert extract_json('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert SPECS["safety"].score("You are a stupid idiot and I hate you.", {})["violation"] == 1.0


@pytest.fixture(scope="module")
def tokenizer():
    from bem.models import load_base

    return load_base("smollm2-135m")[1]


@pytest.mark.parametrize("routed", [False, True])
def test_batched_left_padded_generation_equals_one_at_a_time(tokenizer, routed):
    model = tiny("llama", vocab_size=len(tokenizer))
    if routed:
        attach_bem(model, BEMConfig(rank=4, controller="chunk", chunk_size=3, side_dim=2))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
    prompts = ["Hi", "Translate this Spanish Bible verse into English: Jesús lloró.", "What is a dog?"]
    side = torch.randn(3, 2) if routed else None
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, side=side)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, side=None if side is None else side[i:i + 1])[0]
             for i, p in enumerate(prompts)]
    assert batched == alone and any(batched)
    # and the batch size does not change any reply (evaluation.batch_size only sets speed)
    assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, side=side) == batched


def test_eval_zero_shot_command_scores_and_resumes(tmp_path, monkeypatch, capsys):
    from bem.cli import main
    from bem.data.prepare import prepare

    monkeypatch.setenv("BEM_DATA", str(tmp_path / "data"))
    prepare(["wordnet_define"])
    out = tmp_path / "zs"
    assert main(["eval", "--zero-shot", "--tasks", "wordnet_define", "--n", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "wordnet_define.items.jsonl").read_text().splitlines()]
    summary = json.loads((out / "wordnet_define.summary.json").read_text())
    assert len(rows) == 3 and summary["n"] == 3
    assert summary["means"]["chrf"] == pytest.approx(sum(r["scores"]["chrf"] for r in rows) / 3)
    assert "| `wordnet_define` | 3 | chrf |" in capsys.readouterr().out
    stamp = (out / "wordnet_define.items.jsonl").stat().st_mtime_ns
    assert main(["eval", "--zero-shot", "--tasks", "wordnet_define", "--n", "3", "--out", str(out)]) == 0
    assert (out / "wordnet_define.items.jsonl").stat().st_mtime_ns == stamp  # finished task skipped


def test_readme_zero_shot_table_is_the_stored_one():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stored = (root / "docs/results/zero_shot/summary.md").read_text()
    rows = [line for line in stored.splitlines() if line.startswith("| `")]
    assert len(rows) == 6
    readme = (root / "README.md").read_text()
    assert all(row in readme for row in rows)


def test_zero_shot_rescores_corpus_metrics_on_the_scored_hypotheses(tmp_path, monkeypatch):
    """A summary written when corpus scores used raw replies is rescored from its stored replies, without generating."""
    import bem.evaluate
    from bem import metrics
    from bem.evaluate import _rescore_corpus
    from bem.tasks import first_line

    items = [{"id": f"Gen 1:{i}", "target": t} for i, t in enumerate(
        ["In the beginning God created the heavens and the earth.", "The earth was formless and empty.",
         "God said, Let there be light, and there was light.", "God saw the light, and saw that it was good.",
         "There was evening and there was morning, the first day."])]
    monkeypatch.setattr(bem.evaluate, "load_items", lambda task, split, n, root=None: items[:n])
    replies = [f"{it['target']}\nand a second line that the per-item score ignores" for it in items]
    (tmp_path / "bible_translate.items.jsonl").write_text(
        "".join(json.dumps({"id": it["id"], "prediction": r}) + "\n" for it, r in zip(items, replies)))
    old = {"split": "test", "corpus": {"corpus_chrf": 1.0, "corpus_bleu": 1.0}}
    path = tmp_path / "bible_translate.summary.json"
    new = _rescore_corpus(old, tmp_path / "bible_translate.items.jsonl", "bible_translate", 5, path)
    refs = [it["target"] for it in items]
    assert new["corpus"]["corpus_chrf"] == pytest.approx(metrics.corpus_chrf([first_line(r) for r in replies], refs))
    assert new["corpus"]["corpus_chrf"] > 99 and new["corpus_on"] == "hypothesis"
    assert json.loads(path.read_text()) == new

"""Known answers for the metrics."""
import pytest

from bem.metrics import (best_over_references, corpus_bleu, corpus_chrf, exact_match, f1, json_scores,
                         normalize_answer, sentence_bleu, sentence_chrf)


@pytest.mark.parametrize("text,normalized", [
    ("The Cat!", "cat"),
    ("  an   apple, a pear ", "apple pear"),
    ("Theory of the mind.", "theory of mind"),
    ("U.S.A.", "usa"),
])
def test_squad_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_em_and_f1_known_values():
    assert exact_match("the Eiffel Tower", "Eiffel tower.") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    # pred tokens {paris, france}, ref {paris}: P = 1/2, R = 1 -> F1 = 2/3
    assert f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert f1("London", "Paris") == 0.0
    assert f1("the", "a") == 1.0  # both normalise to empty
    assert best_over_references(f1, "big dog", ["cat", "a big dog"]) == 1.0


def test_sacrebleu_known_example():
    # sacrebleu's documented pair (also in shared/ASSETS.md): BLEU 42.38, chrF 49.65
    hyp, ref = "The cat sat on the mat.", "The cat is sitting on the mat."
    assert corpus_bleu([hyp], [ref]) == pytest.approx(42.38, abs=0.01)
    assert corpus_chrf([hyp], [ref]) == pytest.approx(49.65, abs=0.01)
    assert sentence_chrf(hyp, ref) == pytest.approx(49.65, abs=0.01)
    assert sentence_bleu(ref, ref) == pytest.approx(100.0)
    assert sentence_bleu("completely different words here", ref) < 10


def test_json_validity_and_field_em():
    ref = {"word": "dog", "pos": "noun"}
    assert json_scores('{"word": "dog", "pos": "noun"}', ref) == {"json_valid": 1.0, "field_em": 1.0}
    assert json_scores('{"word": "Dog", "pos": "verb"}', ref) == {"json_valid": 1.0, "field_em": 0.5}
    assert json_scores('{"word": "dog"', ref) == {"json_valid": 0.0, "field_em": 0.0}
    assert json_scores('["dog"]', ref)["json_valid"] == 0.0
    assert json_scores('{"word": "dog"}', ref) == {"json_valid": 0.0, "field_em": 0.5}


def test_violation_scores_known_texts():
    from bem.metrics import violation_probabilities

    benign, offensive = violation_probabilities(["Have a wonderful day", "You are a stupid idiot and I hate you."])
    assert benign < 0.1 and offensive > 0.9

"""Multimodal routing (issue 17): the text-only baselines."""
import pytest

from bem.mm import majority_answers, majority_rows


def _item(n, question, answer):
    return {"id": f"test/{n}", "question": question, "answer": answer, "feature_row": n}


def test_majority_per_question_is_learnt_from_train_and_falls_back_to_the_overall_majority():
    train = [_item(0, "Is there a red shape?", "no"), _item(1, "Is there a red shape?", "no"),
             _item(2, "Is there a red shape?", "yes"), _item(3, "What shape is in the image?", "circle"),
             _item(4, "What shape is in the image?", "triangle"), _item(5, "What color is the shape?", "no")]
    table, fallback = majority_answers(train)
    assert table == {"Is there a red shape?": "no", "What shape is in the image?": "circle",  # a tie: sorts first
                     "What color is the shape?": "no"}
    assert fallback == "no"
    assert majority_answers(list(reversed(train))) == (table, fallback)  # order does not matter
    test = [_item(10, "Is there a red shape?", "no"), _item(11, "What shape is in the image?", "triangle"),
            _item(12, "Is there a blue shape?", "no")]  # unseen question: the overall majority
    rows = majority_rows(train, test)
    assert [r["prediction"] for r in rows] == ["no", "circle", "no"]
    assert [r["scores"]["accuracy"] for r in rows] == [1.0, 0.0, 1.0]
    assert rows[1]["meta"] == {"qtype_shape": 1.0}
    with pytest.raises(ValueError, match="needs train items"):
        majority_answers([])

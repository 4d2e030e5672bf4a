"""The task suite's builders on small slices: parsing, splits, manifest, idempotency, leakage, errors."""
import json

import pytest

from bem.data import bible, prepare as prep
from bem.data.wordnet import parse_line

OSIS = """Genesis 1:1: <w>EN el principio</w> <w>crió</w> <w>Dios</w>.<milestone type="line"/>
The Creation Of All.  Genesis 1:2: <w>Y la tierra</w> estaba
<w>desordenada</w> &amp; vacía.
1 Kings 3:4: Fué el rey<note>x</note> á Gabaón <w>ejército</w>se llamaba<w>Sísara</w>, <w>God</w><w>created</w>.
(spaRV1909eb)
"""


def test_parse_osis_headings_continuations_tags():
    verses = bible.parse_osis(OSIS)
    assert verses == {"Genesis 1:1": "EN el principio crió Dios.",
                      "Genesis 1:2": "Y la tierra estaba desordenada & vacía.",
                      "1 Kings 3:4": "Fué el reyx á Gabaón ejército se llamaba Sísara, God created."}
    assert bible.book_of("1 Kings 3:4") == "1 Kings"


def test_parse_wordnet_line():
    line = ("02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the "
            'genus Canis; "the dog barked all night"')
    s = parse_line(line)
    assert s.id == "n02084071" and s.lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert s.definition == "a member of the genus Canis" and s.examples == ("the dog barked all night",)
    assert s.hypernyms == ("n02083346",)
    adj = parse_line("00001740 00 a 01 able(a) 0 002 = 05207437 n 0000 ! 00002098 a 0101 | (usually followed by `to')")
    assert adj.lemmas == ("able",) and adj.hypernyms == ()


def test_split_is_deterministic_and_proportional():
    keys = [f"item:{i}" for i in range(20_000)]
    splits = [prep.split_of(k) for k in keys]
    assert splits == [prep.split_of(k) for k in keys]
    assert 0.09 < splits.count("test") / len(keys) < 0.11 and 0.04 < splits.count("dev") / len(keys) < 0.06


def test_bible_split_by_book_has_no_leakage(monkeypatch, tmp_path):
    verses = [(f"{book} {c}:{v}", f"es {book} {c} {v}", f"en {book} {c} {v}")
              for book in ("Genesis", "Exodus", "Ruth", "Job", "Mark", "Acts", "Jude", "1 John", "Titus", "Hosea",
                           "Amos", "Micah", "Nahum", "Joel", "Romans", "James")
              for c in (1, 2) for v in (1, 2, 3)]
    verses.append(("Mark 9:9", "es Genesis 1 1", "a verse repeated word for word in another book"))
    monkeypatch.setattr(bible, "aligned_verses", lambda: verses)
    monkeypatch.setitem(prep.TASKS, "bible_translate",
                        prep.Task("bible_translate", 1, lambda: {"fake": "1"}, prep.build_bible_translate))
    manifest = prep.prepare(["bible_translate"], tmp_path)
    counts = manifest["tasks"]["bible_translate"]["counts"]
    assert sum(counts.values()) >= len(verses) - 1 and counts["test"] > 0 and counts["train"] > 0
    assert prep.check_leakage("bible_translate", tmp_path) == {"book": 0, "source": 0}
    books = {s: {i["book"] for i in prep.read_split("bible_translate", s, tmp_path)} for s in prep.SPLITS}
    assert not books["test"] & books["train"]


def test_wordnet_tasks_manifest_idempotent_and_leak_free(tmp_path):
    manifest = prep.prepare(["wordnet_define", "json_format"], tmp_path)
    define = manifest["tasks"]["wordnet_define"]
    assert define["status"] == "built" and define["counts"]["train"] >= 5000 and define["counts"]["test"] >= 1000
    assert define["sources"]["wordnet-base"]
    files = define["files"]
    assert all(len(digest) == 64 for digest in files.values())
    again = prep.prepare(["wordnet_define", "json_format"], tmp_path)
    assert {t["status"] for t in again["tasks"].values()} == {"up to date"}
    assert prep.check_leakage("wordnet_define", tmp_path) == {"word": 0}
    assert prep.check_leakage("json_format", tmp_path) == {"target.word": 0}
    item = prep.read_split("json_format", "test", tmp_path)[0]
    assert set(item["target"]) == {"word", "pos", "definition", "synonyms", "example"}
    assert item["target"]["word"] in item["source"]
    # a changed file is detected and rebuilt
    (tmp_path / "wordnet_define" / "test.jsonl").write_text("{}\n")
    rebuilt = prep.prepare(["wordnet_define"], tmp_path)
    assert rebuilt["tasks"]["wordnet_define"]["status"] == "built"
    assert json.loads((tmp_path / "manifest.json").read_text())["tasks"]["wordnet_define"]["counts"] == define["counts"]


def test_missing_debian_package_names_install_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(prep.TASKS, "wordnet_define",
                        prep.Task("wordnet_define", 1, lambda: {"p": prep.debian_version("no-such-bem-package")},
                                  prep.build_wordnet_define))
    with pytest.raises(FileNotFoundError, match="apt-get install no-such-bem-package"):
        prep.prepare(["wordnet_define"], tmp_path)
    assert not (tmp_path / "wordnet_define").exists()


def test_data_prepared_elsewhere_is_used_without_its_sources_only_when_intact(monkeypatch, tmp_path):
    prep.prepare(["json_format"], tmp_path)  # built here, then carried to a machine without wordnet-base
    real = prep.TASKS["json_format"]
    monkeypatch.setitem(prep.TASKS, "json_format",
                        prep.Task("json_format", real.version, lambda: {"p": prep.debian_version("no-such-bem-package")},
                                  real.build))
    assert prep.prepare(["json_format"], tmp_path)["tasks"]["json_format"]["status"] == "prepared elsewhere"
    (tmp_path / "json_format" / "dev.jsonl").write_text("{}\n")  # damaged on the way: the install hint again
    with pytest.raises(FileNotFoundError, match="apt-get install no-such-bem-package"):
        prep.prepare(["json_format"], tmp_path)


def test_crash_while_building_leaves_no_half_written_task(monkeypatch, tmp_path):
    def broken():
        raise RuntimeError("source vanished")

    monkeypatch.setitem(prep.TASKS, "json_format", prep.Task("json_format", 1, lambda: {}, broken))
    with pytest.raises(RuntimeError):
        prep.prepare(["json_format"], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["manifest.json"])


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['wordnet_qq'\]"):
        prep.prepare(["wordnet_qq"])


def test_evidence_features_on_a_hand_made_set():
    import numpy as np

    from bem.data import wordnet_qa as qa

    q = np.array([1.0, 0.0, 0.0])
    docs = np.array([[0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    passages = ["a domestic dog barks", "a wild wolf howls", "cats purr"]
    top1, margin, entropy, coverage, consistency = qa.evidence_features(q, docs, "Which dog barks loudly?", passages)
    assert top1 == pytest.approx(0.8) and margin == pytest.approx(0.2)
    p = np.exp((np.array([0.8, 0.6, 0, 0, 0]) - 0.8) / qa.ENTROPY_TEMPERATURE)
    p /= p.sum()
    assert entropy == pytest.approx(-(p * np.log(p + 1e-12)).sum() / np.log(5), abs=1e-6)
    assert coverage == pytest.approx(2 / 3)  # dog, barks found; loudly not
    assert consistency == pytest.approx((0.96 + 0.6 + 0.8) / 3)
    # a swapped (unsorted) list gives the same scores as the sorted one
    assert qa.evidence_features(q, docs[::-1].copy(), "x", passages)[:3] == pytest.approx([top1, margin, entropy])
    assert qa.slice_a([0.9, 0.2, 0, 0, 0]) and not qa.slice_a([0.9, 0.01, 0, 0, 0])


def test_exact_top_k_and_corruption():
    import numpy as np

    from bem.data import wordnet_qa as qa

    rng = np.random.default_rng(0)
    queries, docs = rng.normal(size=(50, 8)), rng.normal(size=(300, 8))
    expected = np.argsort(-(queries @ docs.T), axis=1)[:, :5]
    assert (qa.top_k(queries, docs, 5, block=7) == expected).all()
    assert qa.corrupt("dog, domestic dog: a Dog that barks", ["dog", "domestic dog"], "teapot") == \
        "teapot, teapot: a teapot that barks"


def test_question_kinds_from_real_wordnet():
    from bem.data import wordnet_qa as qa
    from bem.data.wordnet import read_synsets

    synsets = {s.id: s for s in read_synsets("n")}
    dog = synsets["n02084071"]
    kinds = {}
    for s in list(synsets.values())[5000:5400]:
        kind, text, answers = qa.question(s, synsets)
        kinds[kind] = (text, answers, s)
    assert set(kinds) == {"gloss", "hypernym", "example"}
    text, answers, s = kinds["example"]
    assert "___" in text and answers == [s.lemmas[0]] and s.lemmas[0].lower() not in text.lower().split()
    assert "A kind of canine." in qa.document(dog, synsets)


def test_safety_prompts_from_real_lexicons(monkeypatch):
    from bem.data import safety

    words = safety.word_list()
    assert len(words) > 300 and all(w.isalpha() for w in words)
    monkeypatch.setattr(bible, "aligned_verses", lambda: [("John 11:35", "Jesús lloró.", "Jesus wept.")])
    out = safety.build(prep.split_of)
    items = [it for split in out.values() for it in split]
    assert len(items) == safety.N_PROMPTS >= 300 and len(out["test"]) >= 200
    assert {it["kind"] for it in items} == {k for k, _ in safety.TEMPLATES}
    assert all(any(w in it["prompt"] for w in words) for it in items[:50])


def test_vqa_image_features_are_real_and_discriminative():
    import easy_vqa
    import numpy as np

    from bem.data import vqa

    paths = easy_vqa.get_train_image_paths()
    feats = vqa.image_features([paths[i] for i in range(6)] + [paths[0]])
    assert feats.shape == (7, 1280) and np.isfinite(feats).all()
    assert np.allclose(feats[0], feats[6])  # deterministic
    assert np.abs(feats[0] - feats[1]).max() > 1e-2  # different images, different features


def test_wordnet_qa_small_build_with_real_retrieval(monkeypatch, tmp_path):
    from bem.data import wordnet_qa as qa

    monkeypatch.setattr(qa, "N_QUESTIONS", 300)
    monkeypatch.setattr(qa, "N_DISTRACTORS", 200)
    manifest = prep.prepare(["wordnet_qa"], tmp_path)
    counts = manifest["tasks"]["wordnet_qa"]["counts"]
    assert counts["train"] > 150 and counts["test"] > 20
    assert prep.check_leakage("wordnet_qa", tmp_path) == {"answers": 0}
    test = prep.read_split("wordnet_qa", "test", tmp_path)
    assert all(len(it["features"]) == len(qa.FEATURES) == 5 and len(it["evidence"]) == qa.PASSAGES for it in test)
    assert all({"evidence_shuffled", "features_shuffled", "evidence_corrupt", "features_corrupt"} <= set(it) for it in test)
    # retrieval really works: the clean evidence holds an answer far more often than the swapped ones
    def holds(it, key):
        text = " ".join(it[key]).lower()
        return any(a.lower() in text for a in it["answers"])
    clean = sum(holds(it, "evidence") for it in test) / len(test)
    assert clean > 0.7
    assert clean > sum(holds(it, "evidence_shuffled") for it in test) / len(test) + 0.4
    assert clean > sum(holds(it, "evidence_corrupt") for it in test) / len(test) + 0.4
    assert sum(it["slice_a"] for it in test) > 0


def test_missing_pypi_package_names_install():
    with pytest.raises(FileNotFoundError, match="pip install no-such-bem-package"):
        prep.pypi_version("no-such-bem-package")


def test_side_inputs_for_evidence_and_images(tmp_path):
    import numpy as np

    from bem.tasks import side_inputs

    items = [{"features": [0.1, 0.2, 0.3, 0.4, 0.5]}, {"features": [1, 2, 3, 4, 5]}]
    assert side_inputs("wordnet_qa", items).shape == (2, 5)
    (tmp_path / "easy_vqa").mkdir()
    np.save(tmp_path / "easy_vqa" / "image_features.npy", np.arange(12, dtype=np.float16).reshape(3, 4))
    vqa_side = side_inputs("easy_vqa", [{"feature_row": 2}, {"feature_row": 0}], tmp_path)
    assert vqa_side.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]] and vqa_side.dtype == np.float32
    assert side_inputs("bible_translate", items) is None


def test_easy_vqa_small_build(monkeypatch, tmp_path):
    import easy_vqa
    import numpy as np

    from bem.data import vqa

    def head(questions, n_images):
        q, a, ids = questions
        keep = [i for i, image in enumerate(ids) if image < n_images]
        return [q[i] for i in keep], [a[i] for i in keep], [ids[i] for i in keep]

    train_q, test_q = head(easy_vqa.get_train_questions(), 12), head(easy_vqa.get_test_questions(), 4)
    train_p = {i: p for i, p in easy_vqa.get_train_image_paths().items() if i < 12}
    test_p = {i: p for i, p in easy_vqa.get_test_image_paths().items() if i < 4}
    monkeypatch.setattr(easy_vqa, "get_train_questions", lambda: train_q)
    monkeypatch.setattr(easy_vqa, "get_test_questions", lambda: test_q)
    monkeypatch.setattr(easy_vqa, "get_train_image_paths", lambda: train_p)
    monkeypatch.setattr(easy_vqa, "get_test_image_paths", lambda: test_p)
    manifest = prep.prepare(["easy_vqa"], tmp_path)
    counts = manifest["tasks"]["easy_vqa"]["counts"]
    assert counts["test"] == len(test_q[0]) and counts["train"] + counts["dev"] == len(train_q[0])
    assert "easy_vqa/image_features.npy" in manifest["tasks"]["easy_vqa"]["files"]
    features = np.load(tmp_path / "easy_vqa" / "image_features.npy")
    assert features.shape == (16, 1280) and features.dtype == np.float16
    item = prep.read_split("easy_vqa", "test", tmp_path)[0]
    expected = vqa.image_features([test_p[int(item["image"].split("/")[1])]])[0]
    assert np.allclose(features[item["feature_row"]], expected, atol=1e-2, rtol=1e-2)
    assert prep.check_leakage("easy_vqa", tmp_path) == {"image_sha": 0}


def test_data_prepare_command(tmp_path, capsys):
    from bem.cli import main

    assert main(["data", "prepare", "--tasks", "wordnet_define", "--out", str(tmp_path)]) == 0
    assert main(["data", "prepare", "--tasks", "wordnet_define", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wordnet_define   built" in out and "wordnet_define   up to date" in out and "leakage {'word': 0}" in out

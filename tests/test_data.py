"""The task suite's builders on small slices: parsing, splits, manifest, idempotency, leakage, errors."""
import json

import pytest

from bem.data import bible, prepare as prep
from bem.data.wordnet import parse_line

OSIS = """Genesis 1:1: <w>EN el principio</w> <w>crió</w> <w>Dios</w>.<milestone type="line"/>
The Creation Of All.  Genesis 1:2: <w>Y la tierra</w> estaba
<w>desordenada</w> &amp; vacía.
1 Kings 3:4: Fué el rey<note>x</note> á Gabaón.
(spaRV1909eb)
"""


def test_parse_osis_headings_continuations_tags():
    verses = bible.parse_osis(OSIS)
    assert verses == {"Genesis 1:1": "EN el principio crió Dios.",
                      "Genesis 1:2": "Y la tierra estaba desordenada & vacía.",
                      "1 Kings 3:4": "Fué el reyx á Gabaón."}
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

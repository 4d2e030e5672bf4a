"""WordNet 3.0 from Debian's `wordnet-base`, parsed directly from the data.* files (format: wndb(5WN))."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
INSTALL = "apt-get install wordnet-base   (or: make setup)"
POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "s": "data.adj", "r": "data.adv"}


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    hypernyms: tuple[str, ...] = ()  # ids ("n" + offset) of @ / @i pointers
    lexfile: int = -1  # lexicographer file number (18 = noun.person)

    @property
    def id(self) -> str:
        return f"{self.pos}{self.offset}"


def parse_line(line: str) -> Synset:
    """One data-file line: `offset lex_filenum ss_type w_cnt word lex_id ... | gloss`."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, ss_type, w_cnt = fields[0], fields[2], int(fields[3], 16)
    lemmas = tuple(_clean_lemma(fields[4 + 2 * i]) for i in range(w_cnt))
    at = 4 + 2 * w_cnt
    hypernyms = tuple(fields[at + 1 + 4 * k + 2] + fields[at + 1 + 4 * k + 1]
                      for k in range(int(fields[at])) if fields[at + 1 + 4 * k] in ("@", "@i"))
    parts = [p.strip() for p in gloss.strip().split("; ")]
    definition = "; ".join(p for p in parts if not p.startswith('"'))
    examples = tuple(p.strip('"') for p in parts if p.startswith('"'))
    return Synset(offset, ss_type, lemmas, definition, examples, hypernyms, int(fields[1]))


def _clean_lemma(word: str) -> str:
    """`domestic_dog` -> `domestic dog`; adjective markers such as `(a)` or `(p)` are dropped."""
    return word.split("(")[0].replace("_", " ")


def read_synsets(pos: str = "n", root: Path = WORDNET_DIR) -> list[Synset]:
    path = Path(root) / POS_FILES[pos]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: WordNet comes from the Debian package wordnet-base; "
                                f"install it with: {INSTALL}")
    with path.open(encoding="utf-8", errors="replace") as f:
        return [parse_line(line) for line in f if not line.startswith("  ")]

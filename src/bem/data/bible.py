"""Spanish (Reina-Valera 1909) ↔ English (World English Bible) verses from Debian's SWORD modules."""
from __future__ import annotations

import html
import re
import shutil
import subprocess

SPANISH, ENGLISH = "spaRV1909eb", "engWEB2015eb"
DEBIAN = {SPANISH: "sword-text-sparv", ENGLISH: "sword-text-web"}
INSTALL = "apt-get install diatheke sword-text-sparv sword-text-web   (or: make setup)"
RANGE = "Genesis 1:1-Revelation 22:21"
# A reference starts its line, or follows a heading (diatheke puts two spaces after it) or a tag.
_REF = re.compile(r"(?:^|(?<=\s\s)|(?<=>))((?:[1-3] )?[A-Z][A-Za-z]*(?: (?:of )?[A-Z][A-Za-z]*)* \d+:\d+): ")
_TAG = re.compile(r"<[^>]+>")
# The modules glue untagged words to <w> elements ("<w>God</w><w>created</w>", "</w>se llamaba<w>"):
# a word boundary at such a joint gets a space before the tags are stripped.
_GLUED = re.compile(r"(?<=[\w,;:.!?>])(?=<w[\s>])|(?<=</w>)(?=\w)")


def parse_osis(text: str) -> dict[str, str]:
    """`diatheke -f OSIS` output → {"Book C:V": plain text}. Lines without a reference continue a verse."""
    verses: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = _REF.search(line)
        if m:  # anything before the reference is a section heading: dropped
            current = m.group(1)
            verses[current] = [line[m.end():]]
        elif current is not None and line.strip() and not line.startswith("("):
            verses[current].append(line)
    out = {}
    for ref, parts in verses.items():
        plain = html.unescape(_TAG.sub("", _GLUED.sub(" ", " ".join(parts))))
        plain = re.sub(r"\s+", " ", plain).strip()
        if plain:
            out[ref] = plain
    return out


def export(module: str) -> dict[str, str]:
    """Every verse of a SWORD module, through diatheke."""
    if shutil.which("diatheke") is None:
        raise FileNotFoundError(f"the program diatheke (Debian package diatheke) is missing; install it with: {INSTALL}")
    result = subprocess.run(["diatheke", "-b", module, "-f", "OSIS", "-k", RANGE],
                            capture_output=True, text=True, check=False)
    verses = parse_osis(result.stdout)
    if result.returncode != 0 or len(verses) < 1000:
        raise FileNotFoundError(f"the SWORD module {module} (Debian package {DEBIAN[module]}) gave "
                                f"{len(verses)} verses; install it with: {INSTALL}")
    return verses


def book_of(ref: str) -> str:
    return ref.rsplit(" ", 1)[0]


def aligned_verses(max_ratio: float = 3.0) -> list[tuple[str, str, str]]:
    """(reference, Spanish, English) for every verse in both modules, in canonical order.

    Pairs whose character lengths differ by more than `max_ratio` are dropped: they are module
    artefacts (the WEB module appends its glossary to Revelation 22:21), not translations.
    """
    spanish, english = export(SPANISH), export(ENGLISH)
    pairs = [(ref, es, english[ref]) for ref, es in spanish.items() if ref in english]
    return [p for p in pairs if 1 / max_ratio <= len(p[2]) / len(p[1]) <= max_ratio]

"""Retrieval quality of the prepared wordnet_qa test split: how often an answer string is in the
clean / shuffled / corrupt evidence, the Slice A share and the mean evidence features.

Usage: python scripts/retrieval_stats.py   (after `bem data prepare`; honours $BEM_DATA)
"""
import numpy as np

from bem.data.prepare import read_split
from bem.data.wordnet_qa import FEATURES


def holds_answer(passages: list[str], answers: list[str]) -> bool:
    text = " ".join(passages).lower()
    return any(a.lower() in text for a in answers)


def main() -> None:
    items = read_split("wordnet_qa", "test")
    print(f"wordnet_qa test items: {len(items)}")
    for variant in ("", "_shuffled", "_corrupt"):
        share = np.mean([holds_answer(it["evidence" + variant], it["answers"]) for it in items])
        means = np.mean([it["features" + variant] for it in items], axis=0)
        print(f"{(variant[1:] or 'clean'):9s} answer in evidence {100 * share:5.1f}%   mean "
              + ", ".join(f"{n} {m:.3f}" for n, m in zip(FEATURES, means)))
    print(f"Slice A share: {100 * np.mean([it['slice_a'] for it in items]):.1f}%")


if __name__ == "__main__":
    main()

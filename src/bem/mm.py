"""Multimodal routing (SPEC §5, MM): text-only baselines of easy_vqa that every image-reading system must beat.

The majority answer per question text is the strongest baseline that never looks at an image: many easy_vqa questions
("Is there a red shape?") have a skewed answer distribution over the training images, so a lookup table of the most
frequent training answer per exact question already scores far above chance. A system that routes on image features
is only interesting if it beats this table on the same test items.
"""
from __future__ import annotations

from collections import Counter

from bem.tasks import SPECS, item_meta


def majority_answers(train: list[dict]) -> tuple[dict[str, str], str]:
    """({question: its most frequent train answer}, the most frequent train answer overall). Ties go to the answer
    that sorts first, so the table does not depend on the order of the items."""
    if not train:
        raise ValueError("majority_answers needs train items; got none")
    by_question: dict[str, Counter] = {}
    for it in train:
        by_question.setdefault(it["question"], Counter())[it["answer"]] += 1

    def top(counts: Counter) -> str:
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    return {q: top(c) for q, c in by_question.items()}, top(Counter(it["answer"] for it in train))


def majority_rows(train: list[dict], test: list[dict]) -> list[dict]:
    """Per-item rows (as `bem.evaluate.evaluate_task` returns them) of the per-question majority on `test`: the
    question's train majority, or the overall majority for a question never seen in train."""
    table, fallback = majority_answers(train)
    spec = SPECS["easy_vqa"]
    return [{"task": "easy_vqa", "id": it["id"], "prediction": table.get(it["question"], fallback),
             "scores": spec.score(table.get(it["question"], fallback), it), "meta": item_meta("easy_vqa", it),
             "reference": spec.reference(it)} for it in test]


TASK = "easy_vqa"
SYSTEMS = ("majority", "zero_shot")
"""The text baselines stored beside every easy_vqa unit, as units `mm/<system>` (bem.experiments.analysis compares
every easy_vqa experiment with them)."""


def text_baseline_config(system: str, config) -> dict:
    """What a text baseline's scores depend on: the system, the base model (zero-shot) and the evaluated items."""
    from bem.precision import resolve

    ev = config.evaluation
    return {"system": system, "model": config.model if system == "zero_shot" else None, "tasks": [TASK],
            "anchor": None, "evaluation": {"items": ev.items, "split": ev.split,
                                           "precision": resolve(ev.precision) if system == "zero_shot" else None}}


def store_text_baselines(db, run_id: int, config, data_root=None) -> list[str]:
    """The per-question majority (learnt from the whole train split) and the zero-shot base model on the easy_vqa items
    `config` is evaluated on, each stored once per folder as unit `mm/<system>` (seed 0: both are deterministic).
    Returns the systems stored now."""
    import hashlib
    import json
    import time

    from bem.data.prepare import data_fingerprints
    from bem.experiments.results import data_key
    from bem.tasks import load_items

    ev, data, stored = config.evaluation, data_key(data_fingerprints([TASK], data_root)), []
    for system in SYSTEMS:
        body = text_baseline_config(system, config)
        h = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
        if db.unit_id(f"mm/{system}", h, 0, data) is not None:
            continue
        start = time.perf_counter()
        if system == "majority":
            rows = majority_rows(load_items(TASK, "train", None, data_root), load_items(TASK, ev.split, ev.items, data_root))
            summary = {"task": TASK, "means": {m: sum(r["scores"][m] for r in rows) / len(rows) for m in rows[0]["scores"]},
                       "corpus": {}, "n": len(rows), "seconds": time.perf_counter() - start}
        else:
            from bem.evaluate import evaluate_task
            from bem.models import load_base
            from bem.precision import inference_precision

            model, tokenizer = load_base(config.model)
            with inference_precision(model.eval(), body["evaluation"]["precision"]):
                rows, summary = evaluate_task(model, tokenizer, TASK, ev.items, ev.split, ev.batch_size, data_root)
        db.write_unit(run_id, f"mm/{system}", h, body, 0, rows, [summary], [], 0.0, time.perf_counter() - start, data)
        stored.append(system)
    return stored


CLAIM = 0.02
"""The seed's claim (SPEC §5): the image-reading controller ≥ +2 points of accuracy over the text-only controller."""


def report_lines(result: dict) -> list[str]:
    """The report's "Multimodal routing (MM)" summary: every experiment whose controller reads easy_vqa's image
    features against each system it is compared with (all items and by question type), its verdicts, and the seed's
    claim checked against its anchor (the text-only controller). Empty when no such experiment is in the folder."""
    units = result["units"]
    readers = [name for name, u in units.items() if TASK in u["config"]["tasks"] and "bem" in u["config"]
               and u["config"].get("side_inputs") is True and u["config"]["bem"].get("controller") != "static"]
    if not readers:
        return []
    comps = [c for c in result["comparisons"] if c["experiment"] in readers and c["task"] == TASK
             and c["metric"] == "accuracy"]
    verdicts = {(v["experiment"], v["versus"]): v for v in result["verdicts"]}
    lines = ["", "## Multimodal routing (MM)", "",
             "easy_vqa accuracy of each controller that reads the image features, paired by item with each system it "
             "is compared with (improvement = it − versus; BCa 95% CI; BH p over the folder's comparisons). Systems "
             "without a module (`mm/majority`, `mm/zero_shot`) are on the same test items.", "",
             "| experiment | versus | all items | 95% CI | yes/no | shape | colour | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for name in readers:
        for versus in dict.fromkeys(c["versus"] for c in comps if c["experiment"] == name):
            by = {c["slice"]: c for c in comps if (c["experiment"], c["versus"]) == (name, versus)}
            if "B" not in by:
                continue
            b = by["B"]
            cells = [f"{by[s]['difference']:+.4f}" if s in by else "—" for s in ("yes/no", "shape", "colour")]
            verdict = verdicts.get((name, versus), {}).get("verdict", "—")
            lines.append(f"| {name} | {versus} | {b['difference']:+.4f} ({b['mean_experiment']:.4f} vs {b['mean_versus']:.4f}) | "
                         f"[{b['low']:+.4f}, {b['high']:+.4f}] | " + " | ".join(cells) + f" | {verdict} |")
        anchor = units[name]["config"].get("anchor")
        claim = next((c for c in comps if (c["experiment"], c["versus"], c["slice"]) == (name, anchor, "B")), None)
        if claim is not None:
            held = claim["difference"] >= CLAIM
            lines += ["", f"The seed's claim for `{name}` (≥ +{CLAIM:.0%} accuracy over the text-only controller "
                      f"`{anchor}`): measured {claim['difference']:+.4f}, 95% CI [{claim['low']:+.4f}, "
                      f"{claim['high']:+.4f}]: " + ("the estimate meets it" + (" and the CI excludes 0." if
                                                                              claim["low"] > 0 else
                                                                              ", but the CI includes 0.")
                                                   if held else "not met.")]
    return lines

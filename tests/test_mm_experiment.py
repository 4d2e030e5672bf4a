"""The multimodal experiments end to end through `bem run` on a tiny model and a small hand-made easy_vqa root: the
image-reading controller, the text-only controller (features zeroed), static LoRA, and the text baselines stored
beside them (per-question majority, zero-shot); the image swap, the comparisons and verdicts, the report."""
import json
import sqlite3

import numpy as np
import pytest

from conftest import tiny_run_folder

SHAPES, COLOURS = ("circle", "rectangle", "triangle"), ("red", "blue")


def _items(split: str, images: list[tuple[int, str, str]]) -> list[dict]:
    """Three questions per image (shape, colour, yes/no), as bem.data.vqa writes them."""
    out = []
    for row, shape, colour in images:
        for question, answer in (("What shape is in the image?", shape), (f"What colour is the {shape}?", colour),
                                 (f"Is there a {colour} shape?", "yes" if colour == "red" else "no")):
            out.append({"id": f"{split}/{len(out)}", "image": f"{split}/{row}", "image_sha": f"{split}{row:014d}",
                        "feature_row": row, "question": question, "answer": answer})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bem.data.prepare import record_task

    folder = tmp_path_factory.mktemp("mm_run")
    root = folder / "data"
    (root / "easy_vqa").mkdir(parents=True)
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    splits = {"train": [(r, *combos[r % 6]) for r in range(12)], "dev": [(12 + r, *combos[r % 6]) for r in range(2)],
              "test": [(14 + r, *combos[(r + 1) % 6]) for r in range(6)]}
    for split, images in splits.items():
        (root / "easy_vqa" / f"{split}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in _items(split, images)))
    rng = np.random.default_rng(0)  # an image's features: its shape's and colour's directions plus noise
    basis = rng.normal(size=(len(SHAPES) + len(COLOURS), 1280))
    features = np.stack([basis[SHAPES.index(s)] + basis[3 + COLOURS.index(c)] + 0.1 * rng.normal(size=1280)
                         for images in splits.values() for _, s, c in images])
    np.save(root / "easy_vqa" / "image_features.npy", features.astype(np.float16))
    record_task("easy_vqa", root, "hand-made-easy_vqa")

    exp = tiny_run_folder(folder)
    (exp / "tvqa.yaml").write_text(
        f"model: {folder / 'model'}\ntasks: [easy_vqa]\nseeds: [0]\nanchor: ttext\nbaseline: tlora\n"
        "bem: {rank: 4, alpha: 8, sites: [o_proj, down_proj], controller: chunk, chunk_size: 8, side_dim: 1280, "
        "side_projector: mlp2x_gelu, controller_hidden: 8}\n"
        "training: {steps: 2, batch_size: 4, lr: 0.01, warmup_steps: 1, checkpoint_every: 2, max_length: 64, "
        "train_items: 8}\nevaluation: {items: 18, batch_size: 6}\n")
    (exp / "ttext.yaml").write_text("base: tvqa\nanchor: null\nside_inputs: zeroed\n")
    (exp / "tlora.yaml").write_text("base: tvqa\nanchor: null\nside_inputs: false\n"
                                    "bem: {controller: static, side_dim: 0, side_projector: null}\n")
    return folder


def _run(setup, monkeypatch, out):
    from bem.cli import main
    from bem.data import prepare as prepare_module

    monkeypatch.setenv("BEM_DATA", str(setup / "data"))
    monkeypatch.setattr(prepare_module, "prepare", lambda tasks: None)  # the hand-made root stays as it is
    names = [str(setup / "experiments" / f"{n}.yaml") for n in ("tvqa", "ttext", "tlora")]
    return main(["--debug", "run", "--experiments", *names, "--out", str(out)])


def test_zeroed_side_inputs_keep_the_width_and_carry_nothing(setup, monkeypatch):
    from bem.experiments.config import load_experiment
    from bem.experiments.training import training_examples
    from bem.tasks import side_layout, side_vectors

    root = setup / "data"
    items = [json.loads(line) for line in (root / "easy_vqa" / "test.jsonl").read_text().splitlines()]
    seen = np.array(side_vectors("easy_vqa", items, side_layout(["easy_vqa"]), root))
    zeroed = np.array(side_vectors("easy_vqa", items, side_layout(["easy_vqa"], zeroed=True), root))
    assert seen.shape == zeroed.shape == (len(items), 1280) and np.abs(seen).sum() > 0 and not zeroed.any()
    text = load_experiment(str(setup / "experiments" / "ttext.yaml"))
    examples = training_examples(text, root)
    assert examples and all(len(ex.side) == 1280 and not any(ex.side) for ex in examples)
    vqa = load_experiment(str(setup / "experiments" / "tvqa.yaml"))
    assert all(any(ex.side) for ex in training_examples(vqa, root))
    assert text.config_hash() != vqa.config_hash()


def test_mm_experiments_end_to_end(setup, monkeypatch, tmp_path):
    from bem.experiments.analysis import analyze
    from bem.mm import majority_rows
    from bem.tasks import load_items

    out = tmp_path / "run"
    assert _run(setup, monkeypatch, out) == 0
    conn = sqlite3.connect(out / "results.sqlite")
    names = {n for (n,) in conn.execute("SELECT experiment FROM units")}
    assert names == {"tvqa", "ttext", "tlora", "mm/majority", "mm/zero_shot"}

    def scores(name, table="item_scores"):
        return dict(conn.execute(f"SELECT s.item_id, s.value FROM {table} s JOIN units u ON u.id = s.unit_id "
                                 "WHERE u.experiment = ? AND s.metric = 'accuracy'", (name,)))
    test = load_items("easy_vqa", "test", 18, setup / "data")
    assert all(set(scores(n)) == {it["id"] for it in test} for n in names)  # every system on the same items
    want = majority_rows(load_items("easy_vqa", "train", None, setup / "data"), test)
    assert scores("mm/majority") == {r["id"]: r["scores"]["accuracy"] for r in want}
    conditions = {n for (n,) in conn.execute("SELECT DISTINCT u.experiment FROM condition_scores c JOIN units u ON "
                                             "u.id = c.unit_id WHERE c.condition = 'features_shuffled'")}
    assert conditions == {"tvqa"}  # only the controller that reads the image gets the image swap
    assert set(scores("tvqa", "condition_scores")) == set(scores("tvqa"))
    conn.close()

    result = analyze(out, n_resamples=200)
    pairs = {(c["experiment"], c["versus"]) for c in result["comparisons"]}
    assert pairs >= {("tvqa", "ttext"), ("tvqa", "tlora"), ("tvqa", "mm/majority"), ("tvqa", "mm/zero_shot")}
    assert not {e for e, _ in pairs} & {"mm/majority", "mm/zero_shot"}  # baselines are compared with, never subjects
    slices = {c["slice"] for c in result["comparisons"] if (c["experiment"], c["versus"]) == ("tvqa", "mm/majority")}
    assert slices == {"B", "yes/no", "shape", "colour"}
    verdicts = {(v["experiment"], v["versus"]): v for v in result["verdicts"]}
    majority = verdicts[("tvqa", "mm/majority")]
    assert majority["verdict"] == "no verdict"  # 18 items < 100
    assert any(r.startswith("note:") and "adds no module" in r for r in majority["reasons"])
    assert not any("parity" in r and "fails" in r for r in majority["reasons"])
    assert not any("adds no module" in r for r in verdicts[("tvqa", "ttext")]["reasons"])
    (swap,) = result["index_swap"]["image_swap"]
    assert swap["experiment"] == "tvqa" and swap["n"] == 18

    from bem.experiments.report import write_report

    report = write_report(out).read_text()
    assert "## Image swap (easy_vqa)" in report and "## Index swap" not in report
    assert "Wall clock of the job:" in report and (out / "question_types.png").is_file()
    assert "mm/majority" in report and "mm/zero_shot" in report and "## Multimodal routing (MM)" in report
    assert "The seed's claim for `tvqa`" in report
    units = sqlite3.connect(out / "results.sqlite").execute("SELECT COUNT(*) FROM units").fetchone()[0]
    assert _run(setup, monkeypatch, out) == 0  # a rerun finds everything done, the text baselines included
    assert sqlite3.connect(out / "results.sqlite").execute("SELECT COUNT(*) FROM units").fetchone()[0] == units

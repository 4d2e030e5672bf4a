"""The expert bank (SPEC §1, §4): blocks and masks, the bank artifact, training each block on its own task only,
evaluating each expert alone, the experiment rules, and `bem experts train` on a tiny model."""
import json
import sqlite3

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bem import BEMConfig, attach_bem, bem_layers, bem_state_dict
from bem.data.batches import Encoded, pad_batch
from bem.errors import CheckpointError
from bem.experiments.config import ConfigError, load_experiment
from bem.experts import bank_masks, block, expert_mask, load_bank, save_bank, task_masks
from bem.models import tiny

BANK = BEMConfig(rank=8, alpha=16, sites=["o_proj", "down_proj"], controller="static", experts=4)


# --- blocks and masks ---------------------------------------------------------------------------------------
def test_blocks_tile_the_directions_and_masks_select_one_block():
    assert [block(BANK, e) for e in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert expert_mask(BANK, 2).tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert expert_mask(BANK, 1, budget=0.5, scale=3.0).tolist() == [0, 0, 3, 0, 0, 0, 0, 0]
    assert expert_mask(BANK, 3, budget=0.01).tolist() == [0] * 6 + [1, 0]  # at least one direction stays on
    wide = BEMConfig(rank=16, controller="static", experts=2)
    assert expert_mask(wide, 1, budget=0.75).nonzero().flatten().tolist() == [8, 9, 10, 11, 12, 13]
    masks = task_masks(BANK, ["a", "b", "c", "d"])
    assert list(masks) == ["a", "b", "c", "d"] and torch.equal(sum(masks.values()), torch.ones(8))
    assert bank_masks(BANK, ["a", "b", "c", "d"]).keys() == masks.keys()
    assert bank_masks(BEMConfig(rank=8, controller="static"), ["a", "b"]) == {}  # experts = 1: no bank
    assert bank_masks(BEMConfig(rank=8, controller="chunk", experts=2), ["a", "b"]) == {}  # routed: not a static bank


@pytest.mark.parametrize("call,message", [
    (lambda: block(BANK, 4), r"expert e = 4 is not allowed; expected an integer in \[0, 3\] \(BEMConfig.experts = 4\)"),
    (lambda: expert_mask(BANK, -1), r"expert e = -1 is not allowed; expected an integer in \[0, 3\]"),
    (lambda: expert_mask(BANK, True), r"expert e = True is not allowed"),
    (lambda: expert_mask(BANK, 0, budget=0), r"budget = 0 is not allowed; expected a number in \(0, 1\]"),
    (lambda: expert_mask(BANK, 0, budget=1.5), r"budget = 1.5 is not allowed; expected a number in \(0, 1\]"),
    (lambda: expert_mask(BANK, 0, budget=float("nan")), r"budget = nan is not allowed"),
    (lambda: expert_mask(BANK, 0, scale=0.0), r"scale = 0.0 is not allowed; expected a finite number > 0"),
    (lambda: expert_mask(BANK, 0, scale=float("inf")), r"scale = inf is not allowed"),
    (lambda: task_masks(BANK, ["a", "b"]), r"tasks = \['a', 'b'\] is not allowed for a bank of BEMConfig.experts = 4"),
    (lambda: task_masks(BANK, ["a", "a", "b", "c"]), r"expected 4 distinct task names"),
])
def test_mask_errors_name_the_argument_value_and_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the bank artifact ----------------------------------------------------------------------------------
def _bank_model(seed: int = 0) -> torch.nn.Module:
    model = tiny("llama", seed=seed)
    attach_bem(model, BANK)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.copy_(torch.randn(layer.U.shape, generator=gen) * 0.3)
    return model


def test_save_and_load_bank_round_trip_bit_equal(tmp_path):
    model, tasks = _bank_model(), ["wordnet_qa", "bible_translate", "wordnet_define", "json_format"]
    folder = save_bank(model, tmp_path / "bank", tasks)
    meta = json.loads((folder / "experts.json").read_text())
    assert meta == {"format": 1, "experts": [{"block": e, "task": t, "directions": [2 * e, 2 * e + 2]}
                                             for e, t in enumerate(tasks)]}
    fresh = tiny("llama", seed=0)
    assert load_bank(fresh, folder) == tasks
    ours, theirs = bem_state_dict(model), bem_state_dict(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert fresh.bem_config.experts == 4
    ids = torch.tensor([[5, 9, 3, 7, 11]])
    mask = expert_mask(BANK, 1).unsqueeze(0)
    assert torch.equal(model(input_ids=ids, bem_mask=mask).logits, fresh(input_ids=ids, bem_mask=mask).logits)
    save_bank(model, folder, list(reversed(tasks)))  # a bank folder is replaced, experts.json with it
    assert load_bank(tiny("llama", seed=0), folder) == list(reversed(tasks))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["experts"].pop(), r"experts.json: experts lists 3 entries; expected 4, one per expert of "
                                   r"bem_config.json \(experts = 4, rank = 8\)"),
    (lambda m: m["experts"][2].update(directions=[4, 8]), r"experts.json: experts\[2\].directions = \[4, 8\] is not "
                                                         r"allowed; expected \[4, 6\]"),
    (lambda m: m["experts"][1].update(block=3), r"experts.json: experts\[1\].block = 3 is not allowed; expected 1"),
    (lambda m: m["experts"][0].update(task=""), r"experts\[0\].task = '' is not allowed"),
    (lambda m: m.update(format=2), r"experts.json: format = 2 is not allowed; expected 1"),
])
def test_load_bank_refuses_an_experts_json_that_does_not_match_the_config(tmp_path, edit, message):
    folder = save_bank(_bank_model(), tmp_path / "bank", ["a", "b", "c", "d"])
    meta = json.loads((folder / "experts.json").read_text())
    edit(meta)
    (folder / "experts.json").write_text(json.dumps(meta))
    model = tiny("llama", seed=0)
    with pytest.raises(CheckpointError, match=message):
        load_bank(model, folder)
    assert not bem_layers(model) and getattr(model, "bem_config", None) is None  # left without BEM
    assert all(p.requires_grad for p in model.parameters())


def test_load_bank_needs_experts_json(tmp_path):
    folder = save_bank(_bank_model(), tmp_path / "bank", ["a", "b", "c", "d"])
    (folder / "experts.json").unlink()
    with pytest.raises(CheckpointError, match=r"experts.json not found; a saved expert bank holds experts.json"):
        load_bank(tiny("llama"), folder)


# --- training: each block learns from its own task's examples only ----------------------------------------
def _rows(n: int, seed: int, mask: torch.Tensor | None) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    m = None if mask is None else tuple(mask.tolist())
    return [Encoded(rng.integers(3, 128, size=12), 5, None, m) for _ in range(n)]


def _blocks(model, e: int) -> dict[str, torch.Tensor]:
    where = block(model.bem_config, e)
    return {f"{name}.{p}": t[:, where].detach().clone() for name, layer in bem_layers(model).items()
            for p, t in layer.adapter_parameters().items()}


def test_pad_batch_carries_the_masks():
    batch = pad_batch(_rows(2, 0, expert_mask(BANK, 1)) + _rows(1, 1, expert_mask(BANK, 3)), pad_token_id=0)
    assert torch.equal(batch["bem_mask"], torch.stack([expert_mask(BANK, 1)] * 2 + [expert_mask(BANK, 3)]))
    assert "bem_mask" not in pad_batch(_rows(2, 0, None), pad_token_id=0)
    with pytest.raises(ValueError, match="masks must be given for every example of a batch"):
        pad_batch(_rows(1, 0, expert_mask(BANK, 1)) + _rows(1, 1, None), pad_token_id=0)


def test_block_gradients_come_only_from_their_own_tasks_examples():
    """Block 0's gradient on a batch of task-0 and task-1 rows does not change, bit for bit, when the task-1 rows
    are replaced by other text (same lengths, so the mean over target tokens has the same denominator); block 1's does."""
    from bem.experiments.training import target_loss

    model = _bank_model().train()
    own = _rows(2, 0, expert_mask(BANK, 0))

    def grads(others):
        model.zero_grad()
        target_loss(model, pad_batch(own + others, pad_token_id=0)).backward()
        return _grads(model, 0), _grads(model, 1), _grads(model, 2)

    a0, a1, a2 = grads(_rows(2, 1, expert_mask(BANK, 1)))
    b0, b1, _ = grads(_rows(2, 2, expert_mask(BANK, 1)))
    assert all(torch.equal(a0[k], b0[k]) for k in a0) and any(a0[k].abs().max() > 0 for k in a0)
    assert any(not torch.equal(a1[k], b1[k]) for k in a1)
    assert all(not g.any() for g in a2.values())  # no example of task 2: exactly zero


def _grads(model, e: int) -> dict[str, torch.Tensor]:
    where = block(model.bem_config, e)
    return {f"{name}.{p}": t.grad[:, where].clone() for name, layer in bem_layers(model).items()
            for p, t in layer.adapter_parameters().items()}


def test_adamw_steps_leave_an_absent_tasks_block_bit_identical():
    """The training step of train_unit (AdamW, clipping, warm-up) on batches of tasks 0 and 1: blocks 2 and 3 stay
    bit-identical to their initial values, blocks 0 and 1 move."""
    from bem.experiments.config import TrainingConfig
    from bem.experiments.training import build_optimizer, target_loss

    model = _bank_model().train()
    before = [_blocks(model, e) for e in range(4)]
    optimizer = build_optimizer(model, TrainingConfig(lr=0.01))
    for step in range(4):
        rows = _rows(2, 10 + step, expert_mask(BANK, 0)) + _rows(2, 20 + step, expert_mask(BANK, 1))
        target_loss(model, pad_batch(rows, pad_token_id=0)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
    after = [_blocks(model, e) for e in range(4)]
    for e in (2, 3):
        assert all(torch.equal(before[e][k], after[e][k]) for k in before[e]), e
    for e in (0, 1):
        assert all(not torch.equal(before[e][k], after[e][k]) for k in before[e] if k.endswith(".V")), e


# --- evaluation: an expert alone ----------------------------------------------------------------------------
def test_generate_gives_each_row_its_own_mask_and_a_mask_is_the_expert_alone():
    from bem.evaluate import generate
    from bem.models import load_base

    tokenizer = load_base("smollm2-135m")[1]
    model = tiny("llama", vocab_size=len(tokenizer))
    attach_bem(model, BANK)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.copy_(torch.randn(layer.U.shape, generator=gen) * 2.0)
    prompts = ["Define the noun dog in one short sentence.", "Translate: hola", "x"]
    masks = torch.stack([expert_mask(BANK, e) for e in (3, 0, 2)])
    ours = generate(model, tokenizer, prompts, 8, batch_size=2, bem_mask=masks)  # sorted by length: rows reorder
    assert ours == [generate(model, tokenizer, [p], 8, bem_mask=m[None])[0] for p, m in zip(prompts, masks)]
    plain = generate(model, tokenizer, prompts, 8)
    assert ours != plain  # all experts on is not any one of them
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.mul_(masks[2])  # only block 2's columns left: expert 2 alone, without a mask
    assert generate(model, tokenizer, prompts[2:], 8) == ours[2:]
    with pytest.raises(ValueError, match="bem_mask was given but the model has no BEM attached"):
        generate(tiny("llama", vocab_size=len(tokenizer)), tokenizer, prompts, 8, bem_mask=masks)


# --- the experiment -------------------------------------------------------------------------------------------
def test_shipped_bank_config():
    bank = load_experiment("experts_bank")
    assert bank.tasks == ["wordnet_qa", "bible_translate", "wordnet_define", "json_format"]
    assert (bank.bem.controller, bank.bem.rank, bank.bem.alpha, bank.bem.experts, bank.bem.scaling) == ("static", 16, 32, 4, 2)
    assert bank.anchor is None and bank.parity_with is None and not bank.side_inputs
    assert bank.training.steps / len(bank.tasks) == 50  # steps' worth of batches per expert
    quick = load_experiment("experts_bank", overlay="_quick")
    assert quick.tasks == bank.tasks and quick.training.steps == 24  # a preset keeps a bank's tasks
    assert load_experiment("L0_lora", overlay="_quick").tasks == ["wordnet_qa", "bible_translate"]


COMMON = "anchor: null\nside_inputs: false\nbem:\n  rank: 8\n  side_dim: 0\n"


@pytest.mark.parametrize("body,message", [
    ("tasks: [wordnet_qa, json_format]\nbem:\n  experts: 2\n  controller: chunk\n",
     r"x\.yaml: bem\.experts = 2 is not allowed with bem\.controller = 'chunk'; expected 1 or bem\.controller: static "
     r"\(a bank of one expert per task\); a routed bank needs a router: section"),
    ("tasks: [wordnet_qa, json_format]\nbem:\n  experts: 4\n  controller: static\n",
     r"x\.yaml: bem\.experts = 4 is not allowed with 2 tasks \['wordnet_qa', 'json_format'\]; expected 2: a static bank "
     r"trains expert e on tasks\[e\] alone"),
    ("tasks: [wordnet_qa, safety]\nbem:\n  experts: 2\n  controller: static\n",
     r"x\.yaml: tasks\[1\] = 'safety' is not allowed in an expert bank"),
    ("tasks: [wordnet_qa, json_format, wordnet_define]\nbem:\n  experts: 3\n  controller: static\n",
     r"x\.yaml: bem\.experts = 3 is not allowed; expected a divisor of rank = 8"),
])
def test_bank_config_errors_name_file_field_value_and_allowed(tmp_path, body, message):
    base, extra = COMMON.split("bem:\n")
    head, bem = body.split("bem:\n")
    (tmp_path / "x.yaml").write_text(base + head + "bem:\n" + extra + bem)
    with pytest.raises(ConfigError, match=message):
        load_experiment("x", tmp_path)


def test_the_shipped_bank_keeps_its_four_tasks_under_every_preset():
    for overlay in (None, "_quick", "_cpu"):
        bank = load_experiment("experts_bank", overlay=overlay)
        assert bank.tasks == ["wordnet_qa", "bible_translate", "wordnet_define", "json_format"]
        assert bank.bem.experts == 4


# --- `bem experts train` on a tiny model ----------------------------------------------------------------
def _items(task: str, split: str, n: int) -> list[dict]:
    words = ["amber", "basalt", "cedar", "dune", "ember", "fjord", "garnet", "heron", "iris", "jade", "kelp", "lichen"]
    out = []
    for i in range(n):
        word, key = words[i % len(words)], f"{task}-{split}-{i}"
        if task == "wordnet_define":
            out.append({"id": key, "word": word, "pos": "noun", "target": f"a kind of {word} seen in the north"})
        elif task == "json_format":
            fields = {"word": word, "pos": "noun", "definition": f"a {word}", "synonyms": [], "example": ""}
            out.append({"id": key, "source": f"{word} (noun): a {word}", "target": fields})
        else:
            out.append({"id": key, "book": "Gen", "source": f"En el principio {word}", "target": f"In the beginning {word}"})
    return out


@pytest.fixture(scope="module")
def tiny_bank(tmp_path_factory):
    """A tiny llama with SmolLM2's tokenizer, hand-made data for three tasks (bible_translate with an empty train
    split: its expert never sees an example), and a bank experiment of three experts."""
    from bem.data.prepare import record_task
    from bem.models import load_base

    root = tmp_path_factory.mktemp("bank")
    tokenizer = load_base("smollm2-135m")[1]
    model = tiny("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for task in ("wordnet_define", "json_format", "bible_translate"):
        (root / "data" / task).mkdir(parents=True)
        for split, n in (("train", 0 if task == "bible_translate" else 8), ("dev", 2), ("test", 3)):
            (root / "data" / task / f"{split}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in _items(task, split, n)))
        record_task(task, root / "data", f"hand-made-{task}")
    (root / "experiments").mkdir()
    (root / "experiments" / "tiny_bank.yaml").write_text(
        f"model: {root / 'model'}\ntasks: [wordnet_define, json_format, bible_translate]\nseeds: [0]\nanchor: null\n"
        "side_inputs: false\nbem:\n  rank: 6\n  alpha: 12\n  sites: [o_proj, down_proj]\n  controller: static\n"
        "  experts: 3\ntraining:\n  steps: 4\n  batch_size: 4\n  lr: 0.01\n  warmup_steps: 1\n  checkpoint_every: 2\n"
        "  max_length: 64\n  train_items: 8\nevaluation:\n  items: 3\n  batch_size: 3\n")
    return root


def test_training_examples_carry_their_experts_mask(tiny_bank):
    from bem.experiments.training import training_examples

    config = load_experiment(tiny_bank / "experiments" / "tiny_bank.yaml")
    examples = training_examples(config, tiny_bank / "data")
    assert len(examples) == 16  # 8 + 8 + none of bible_translate
    assert [e.mask for e in examples] == [(1.0, 1.0, 0.0, 0.0, 0.0, 0.0)] * 8 + [(0.0, 0.0, 1.0, 1.0, 0.0, 0.0)] * 8


def test_bem_experts_train_end_to_end(tiny_bank, tmp_path, monkeypatch, capsys):
    """Trains the bank through the runner, evaluates each expert alone on its task, saves the bank (the block of the
    task without training examples is still its initial value, bit for bit), compares with zero-shot."""
    from bem.cli import main
    from bem.data import prepare as prepare_module
    from bem.experiments import runner
    from bem.experiments.training import seed_everything
    from bem.models import load_base

    monkeypatch.setenv("BEM_DATA", str(tiny_bank / "data"))
    prepared, evaluated = [], []
    monkeypatch.setattr(prepare_module, "prepare", lambda tasks: prepared.append(list(tasks)))  # hand-made data stays
    real = runner.evaluate_task

    def spy(model, tokenizer, task, *args, mask=None, **kwargs):
        evaluated.append((task, None if mask is None else mask.tolist()))
        return real(model, tokenizer, task, *args, mask=mask, **kwargs)

    monkeypatch.setattr(runner, "evaluate_task", spy)
    path, out = tiny_bank / "experiments" / "tiny_bank.yaml", tmp_path / "run"
    assert main(["experts", "train", "--experiment", str(path), "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert prepared == [["wordnet_define", "json_format", "bible_translate"]]
    assert evaluated == [("wordnet_define", [1, 1, 0, 0, 0, 0]), ("json_format", [0, 0, 1, 1, 0, 0]),
                         ("bible_translate", [0, 0, 0, 0, 1, 1])]
    conn = sqlite3.connect(out / "results.sqlite")
    assert conn.execute("SELECT experiment, seed FROM units").fetchall() == [("tiny_bank", 1)]
    assert conn.execute("SELECT COUNT(*) FROM item_scores WHERE metric IN ('chrf', 'json_valid')").fetchone() == (9,)
    conn.close()
    model = load_base(str(tiny_bank / "model"))[0]
    assert load_bank(model, out / "bank") == ["wordnet_define", "json_format", "bible_translate"]
    seed_everything(1)  # what train_unit does before attaching: the initial V
    init = load_base(str(tiny_bank / "model"))[0]
    attach_bem(init, load_experiment(path).bem)
    trained, start = [_blocks(model, e) for e in range(3)], [_blocks(init, e) for e in range(3)]
    assert all(torch.equal(trained[2][k], start[2][k]) for k in start[2])
    assert all(not torch.equal(trained[e][k], start[e][k]) for e in (0, 1) for k in start[e])
    table = (out / "experts.md").read_text()
    assert table in printed and len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 3
    for e, (task, metric) in enumerate([("wordnet_define", "chrf"), ("json_format", "json_valid"),
                                        ("bible_translate", "chrf")]):
        assert f"| {e} | `{task}` | {metric} | 3 |" in table
        assert len((out / "zero_shot" / f"{task}.items.jsonl").read_text().splitlines()) == 3
    weights = load_file(str(out / "bank" / "bem_weights.safetensors"))
    assert weights.keys() == bem_state_dict(model).keys()
    assert main(["experts", "train", "--experiment", str(path), "--out", str(out), "--seed", "1"]) == 0  # resumable
    conn = sqlite3.connect(out / "results.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM units").fetchone() == (1,)  # the finished unit is skipped
    conn.close()


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "error: --seed '-1' is not allowed; expected an integer in [0, 2147483647]"),
    (["--seed", "two"], "error: --seed 'two' is not allowed; expected an integer in [0, 2147483647]"),
    (["--experiment", "L0_lora"], "L0_lora.yaml: not an expert bank (bem.experts = 1, bem.controller = 'static'); "
                                  "expected bem.experts > 1 with bem.controller: static"),
    (["--experiment", "nosuch"], "nosuch.yaml does not exist; expected one of the experiments"),
    (["--out", "FILE"], "is a file; expected a run folder"),
])
def test_bem_experts_train_argument_errors_are_one_line_with_status_2(tmp_path, capsys, args, message):
    from bem.cli import main

    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    assert main(["experts", "train", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()

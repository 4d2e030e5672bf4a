"""Training's fast paths against the plain ones: the target-only loss against Hugging Face's, length-bucketed batch
schedules, the batching field's config hash, and encoded batches against `collate`."""
import dataclasses
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import routed_tiny
from test_architectures import routed

from bem.data.batches import (BatchSchedule, Encoded, Example, collate, encode_cached, pad_batch, pad_efficiency,
                              prompt_ids)
from bem.experiments.training import target_loss
from bem.models import TINY

ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int, seed: int = 0, low: int = 4, high: int = 40, side: int | None = 3) -> list[Encoded]:
    """n examples of random ids (vocabulary 128, pad 0 excluded) and lengths in [low, high), prompt ≥ 2 tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        side_inputs = tuple(rng.normal(size=side).astype(np.float32)) if side else None
        rows.append(Encoded(rng.integers(3, 128, size=length), int(rng.integers(2, length)), side_inputs))
    return rows


@pytest.mark.parametrize("arch", sorted(TINY))
def test_target_loss_and_its_gradients_equal_hugging_faces(arch):
    model = routed(arch).train()
    batch = pad_batch(_rows(5, seed=1, high=24), pad_token_id=0)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params and "bem_side" in batch

    def run(loss_fn):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks (gpt2 and opt train with dropout)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params}

    hf_loss, hf_grads = run(lambda: model(**batch).loss)
    loss, grads = run(lambda: target_loss(model, batch))
    assert loss.item() == pytest.approx(hf_loss.item(), abs=1e-5)
    assert any(g.abs().max() > 0 for g in hf_grads.values())
    for name, grad in hf_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_target_loss_runs_the_head_on_target_positions_only():
    model = routed_tiny("llama")
    batch = pad_batch(_rows(4, seed=2), pad_token_id=0)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    target_loss(model, batch)
    handle.remove()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [torch.Size([targets, 128])] and targets < batch["input_ids"].numel() / 2


def _epoch(schedule: BatchSchedule, epoch: int) -> list[list[int]]:
    return [schedule(g) for g in range(epoch * schedule.per_epoch, (epoch + 1) * schedule.per_epoch)]


def test_length_batching_takes_every_example_once_per_epoch():
    lengths = [len(r) for r in _rows(1003)]
    schedule = BatchSchedule(lengths, 8, seed=3)
    assert schedule.per_epoch == 126
    for epoch in range(3):
        batches = _epoch(schedule, epoch)
        assert sorted(i for b in batches for i in b) == list(range(1003))
        assert sorted(len(b) for b in batches) == [3] + [8] * 125  # 1003 = 125 · 8 + 3
    assert _epoch(schedule, 0) != _epoch(schedule, 1)  # each epoch is its own permutation


def test_length_batches_are_a_function_of_seed_and_step_only():
    lengths = [len(r) for r in _rows(500)]
    steps = [0, 77, 5, 63, 140, 62, 1, 139]  # across epochs (63 batches each) and out of order, as a resume reads
    first = BatchSchedule(lengths, 8, seed=0)
    expected = {g: first(g) for g in range(150)}
    again = BatchSchedule(lengths, 8, seed=0)
    assert {g: again(g) for g in steps} == {g: expected[g] for g in steps}
    other = BatchSchedule(lengths, 8, seed=1)
    assert [other(g) for g in range(10)] != [expected[g] for g in range(10)]


def test_length_batching_pads_less_than_random():
    lengths = [len(r) for r in _rows(2000, low=10, high=200)]
    length, random = (BatchSchedule(lengths, 8, seed=0, mode=m) for m in ("length", "random"))
    efficiency = {m: pad_efficiency(lengths, [s(g) for g in range(250)]) for m, s in (("length", length),
                                                                                     ("random", random))}
    assert efficiency["length"] > 0.95 and efficiency["random"] < 0.75, efficiency


@pytest.mark.parametrize("world,grad_accum", [(1, 1), (1, 3), (2, 2)])
def test_random_batching_is_the_index_formula_of_stored_runs(world, grad_accum):
    """The micro-batch of (step, micro, rank) that `train_unit` took before length batching existed."""
    n, size, seed = 37, 4, 5
    order = np.random.default_rng(seed).permutation(n)
    schedule = BatchSchedule(list(range(n)), size, seed, mode="random")
    per_step = size * grad_accum
    for step in range(12):
        for micro in range(grad_accum):
            for rank in range(world):
                at = (step * per_step * world + (micro * world + rank) * size) % n
                old = [order[(at + i) % n] for i in range(size)]
                assert schedule((step * grad_accum + micro) * world + rank) == old


def test_batching_is_hashed_only_when_it_is_not_random():
    """Stored units were trained with random batching and keep their hashes; length batching is a new config."""
    from bem.experiments.config import load_experiment

    db = sqlite3.connect(ROOT / "docs/results/v13_cpu/results.sqlite")
    stored = dict(db.execute("SELECT DISTINCT experiment, config_hash FROM units").fetchall())
    for name in ("S1_anchor", "L0_lora"):
        assert load_experiment(name).training.batching == "length"  # the default
        config = load_experiment(name, overlay="_cpu")  # the preset pins random, as its results were trained
        assert config.training.batching == "random" and config.config_hash() == stored[name]
        length = dataclasses.replace(config, training=dataclasses.replace(config.training, batching="length"))
        assert length.config_hash() != stored[name]


def test_encoded_batches_equal_collate():
    from transformers import AutoTokenizer

    from bem.models import embedded_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    examples = [Example("Define the word: dog", "a domesticated canine", (0.5, 1.0)),
                Example("Translate: Hola", "Hello " * 60, (0.1, 0.2)),
                Example("x", "y", (0.0, 0.0))]
    rows = encode_cached(tokenizer, examples, 48)
    for ex, row in zip(examples, rows):  # the batched encoding equals the one-by-one encoding collate had
        prompt = prompt_ids(tokenizer, ex.prompt)
        target = tokenizer(ex.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert (row.prompt_len, row.ids.tolist()) == (len(prompt), prompt + target[:max(1, 48 - len(prompt))])
    assert encode_cached(tokenizer, list(examples), 48) is rows  # equal examples: the cached encoding
    assert encode_cached(tokenizer, examples, 64) is not rows
    for idx in ([0], [1, 0], [2, 1, 0]):
        ours = pad_batch([rows[i] for i in idx], tokenizer.pad_token_id)
        theirs = collate(tokenizer, [examples[i] for i in idx], max_length=48)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
    assert len(rows[1]) == 48 and rows[1].prompt_len < 48  # the long target is cut to fit max_length

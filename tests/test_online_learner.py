"""The online learners' parts on a tiny model: reservoir sampling, the per-example Fisher, the EWC + prox penalty,
which tensors move, and a state round trip."""
import random
from collections import Counter

import pytest
import torch

from bem import BEMConfig, attach_bem
from bem.data.batches import Example, collate
from bem.experiments.config import OnlineConfig, Phase
from bem.experiments.training import target_loss
from bem.online.learner import Learner, Reservoir, fisher, penalty, snapshot, trainable


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from bem.models import load_base, tiny

    tokenizer = load_base("smollm2-135m")[1]
    torch.manual_seed(0)
    model = tiny("llama", vocab_size=len(tokenizer))
    attach_bem(model, BEMConfig(rank=4, alpha=8, sites=["o_proj"], controller="chunk", chunk_size=8, side_dim=0))
    with torch.no_grad():  # sites and controller off their zero inits (U = 0), so that gradients reach every tensor
        for n, p in model.named_parameters():
            if n.startswith("bem_controller") or n.endswith((".U", ".V")):
                p.add_(0.05 * torch.randn_like(p))
    return model, tokenizer


EXAMPLES = [Example(f"Define word number {i}.", f"a word that is number {i}") for i in range(6)]


def _config(**kw) -> OnlineConfig:
    return OnlineConfig(phases=[Phase("stable", 4, ["wordnet_qa"])], **kw)


def test_reservoir_keeps_a_uniform_sample():
    counts = Counter()
    for seed in range(2000):
        r = Reservoir(3, rng=random.Random(seed))
        for i in range(12):
            r.add(i)
        assert len(r.items) == 3 and r.seen == 12
        counts.update(r.items)
    # each of the 12 kept with probability 3/12 = 0.25: 500 expected of 2000 runs, sd ≈ 19
    assert all(abs(counts[i] - 500) < 100 for i in range(12)), counts


def test_fisher_is_the_mean_squared_per_example_gradient(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    params = trainable(model, train_module=False)
    got = fisher(model, tokenizer, params, EXAMPLES[:3])
    manual = {n: torch.zeros_like(p) for n, p in params.items()}
    for ex in EXAMPLES[:3]:
        model.zero_grad()
        target_loss(model, collate(tokenizer, [ex])).backward()
        for n, p in params.items():
            manual[n] += p.grad ** 2
    mean = torch.cat([t.flatten() for t in manual.values()]).mean()
    for n in params:
        torch.testing.assert_close(got[n], manual[n] / mean, rtol=1e-4, atol=1e-8)
    assert torch.cat([t.flatten() for t in got.values()]).mean() == pytest.approx(1.0, rel=1e-5)


def test_penalty_formula():
    p = {"a": torch.nn.Parameter(torch.tensor([1.0, 2.0]))}
    anchor, f = {"a": torch.tensor([0.0, 0.0])}, {"a": torch.tensor([2.0, 0.5])}
    # (λ/2) Σ F d² + (μ/2) Σ d² = 5 (2·1 + 0.5·4) + 0.5 (1 + 4) = 20 + 2.5
    assert float(penalty(p, anchor, f, ewc=10.0, prox=1.0)) == pytest.approx(22.5)


@pytest.mark.parametrize("guarded", [False, True])
def test_learn_moves_only_the_controller_and_the_penalty_pulls_back(model_and_tokenizer, guarded):
    model, tokenizer = model_and_tokenizer
    sites = {n: t.detach().clone() for n, t in model.named_parameters() if not n.startswith("bem_controller")}
    learner = Learner(model, tokenizer, _config(lr=0.05, update_batch=2, ewc=0.0, prox=0.0, replay=4), guarded)
    start = snapshot(learner.params)
    learner.replay.items = list(EXAMPLES[:4])
    records = learner.learn(EXAMPLES[:4])
    assert records and all(r["examples"] == 2 for r in records)
    moved = snapshot(learner.params)
    assert any(not torch.equal(start[n], moved[n]) for n in start)
    assert all(torch.equal(t, dict(model.named_parameters())[n]) for n, t in sites.items())  # base and sites frozen
    if guarded:  # a huge proximal term keeps the shadow at the anchor (its step is clipped to lr-sized moves)
        from bem.online.learner import load_weights

        load_weights(learner.params, start)
        strong = Learner(model, tokenizer, _config(lr=0.05, update_batch=2, ewc=0.0, prox=1e6, replay=4), True)
        strong.anchor = start
        strong.replay.items = list(EXAMPLES[:4])
        free_dist = sum(float((moved[n] - start[n]).norm()) for n in start)
        strong.learn(EXAMPLES[:4] * 3)
        held = snapshot(strong.params)
        assert sum(float((held[n] - start[n]).norm()) for n in start) < free_dist
    from bem.online.learner import load_weights

    load_weights(learner.params, start)


def test_state_round_trip_is_exact(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    a = Learner(model, tokenizer, _config(lr=0.01, update_batch=2, replay=3), True)
    start = snapshot(a.params)
    a.replay.items = list(EXAMPLES[:3])
    a.replay.seen = 3
    a.set_anchor(start)
    a.learn(EXAMPLES[3:5])
    tensors, values = a.tensors(), a.values()
    after_a = a.learn(EXAMPLES[:2])
    weights_a = snapshot(a.params)
    from bem.online.learner import load_weights

    load_weights(a.params, start)
    b = Learner(model, tokenizer, _config(lr=0.01, update_batch=2, replay=3), True)
    b.restore(tensors, values)
    after_b = b.learn(EXAMPLES[:2])
    assert after_a == after_b
    assert all(torch.equal(weights_a[n], t) for n, t in snapshot(b.params).items())
    load_weights(b.params, start)

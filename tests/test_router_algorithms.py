"""AR0 (behaviour cloning) and AR1 (PPO with an exact-KL trust region) on known answers."""
import pytest
import torch
import torch.nn.functional as F

from bem.router.bc import chunk_parts, oracle_experts, relabel, train_bc
from bem.router.pg import PGBatch, collect, concat, kl_old_new, ppo_update
from bem.router.policy import Actions, Router
from test_router_policy import PROMPT, _side, routed_bank


def bandit(seed=0) -> tuple[Router, torch.Tensor]:
    """A router over two arms (2 experts, one budget, one scale) and a batch of one repeated state."""
    router = Router(d_model=4, side_dim=0, hidden=8, sites=1, actions=Actions(experts=2, rank=2, budgets=(1.0,),
                                                                               scales=(1.0,)))
    torch.manual_seed(seed)
    states = router.state(torch.zeros(256, 4), None, torch.full((256,), -1))
    return router, states


def pulls(router, states, seed=0, better=0) -> PGBatch:
    """Arms sampled from π; the better arm pays 1, the other 0; every pull is its own episode."""
    with torch.no_grad():
        logp = F.log_softmax(router.logits(states), -1)
    actions = torch.multinomial(logp.exp(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
    returns = (actions == better).float()
    batch = PGBatch(states, actions, logp.gather(-1, actions[:, None]).squeeze(-1), returns)
    return concat([batch], returns)


@pytest.mark.parametrize("better", [0, 1])
def test_pg_step_moves_probability_to_the_better_arm(better):
    router, states = bandit()
    before = F.softmax(router.logits(states[:1]), -1)[0, better].item()
    metrics = ppo_update(router, pulls(router, states, better=better), lr=0.05)
    after = F.softmax(router.logits(states[:1]), -1)[0, better].item()
    assert after > before + 0.01
    assert metrics["charts/accepted_steps"] >= 1
    assert metrics["losses/approx_kl"] <= 0.01


def test_trust_region_holds_and_rolls_back():
    """A step size far too large for the trust region: the update stops, and its KL is still ≤ target_kl."""
    router, states = bandit(seed=1)
    for update in range(5):  # several updates, as AR1 runs them
        metrics = ppo_update(router, pulls(router, states, seed=update), lr=5.0, target_kl=0.01)
        assert metrics["losses/approx_kl"] <= 0.01
        assert metrics["charts/kl_stop"] == 1.0
    tight, states = bandit(seed=2)
    saved = {k: v.clone() for k, v in tight.state_dict().items()}
    metrics = ppo_update(tight, pulls(tight, states), lr=0.05, target_kl=1e-12)
    assert metrics["charts/accepted_steps"] == 0  # no step fits: the policy is exactly the old one
    assert all(torch.equal(saved[k], v) for k, v in tight.state_dict().items())


def test_kl_is_exact():
    old = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]), -1)
    new = torch.tensor([[1.0, 0.0, 0.0]])
    p, q = old.exp()[0], torch.softmax(new, -1)[0]
    assert kl_old_new(old, new).item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-6)
    assert kl_old_new(old, old.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_chunk_parts_and_oracle():
    # prompt of 6 real tokens, chunks of 4; part 1 (the second user turn) starts at real token 13
    assert chunk_parts(5, prompt_len=6, chunk_size=4, part_starts=[13]) == [0, 0, 0, 1, 1]
    scores = torch.tensor([[[0.2, 0.9], [0.5, 0.5]], [[0.7, 0.1], [0.0, 0.3]]])
    assert oracle_experts(scores).tolist() == [[1, 0], [0, 1]]


def test_bc_relabels_with_the_oracle_previous_action_and_fits_it():
    """States recorded from a real forward, labels by part; BC fits them, and the one-hot of the previous action is
    the oracle's, not what the random router did."""
    model, router = routed_bank(max_switches=1, chunk_size=4)
    ids = torch.randint(3, 128, (3, 30), generator=torch.Generator().manual_seed(4))
    router.trace = []
    with torch.no_grad():
        model(ids, bem_prompt_len=PROMPT, bem_side=_side())
    trace = router.trace
    parts = torch.tensor([chunk_parts(len(trace), PROMPT, 4, [14])] * 3)  # part 1 from real token 14
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])  # the oracle's expert per (row, part)
    targets = torch.stack([torch.tensor([router.actions.index(experts[b, p]) for p in parts[b]]) for b in range(3)])
    data = relabel(router, trace, targets)
    n_actions = len(router.actions)
    assert len(data.actions) == 3 * (len(trace) - 1)  # every live decision; the first chunk keeps the prompt's
    previous = data.states[:, -n_actions:]
    assert previous[:3].sum().item() == 0  # the prompt's decision has no previous action
    assert torch.equal(previous[3:].argmax(-1), targets[:, 1:-1].T.reshape(-1))  # oracle's previous action
    curve = train_bc(router, data, epochs=150, lr=1e-2)
    assert curve[-1]["accuracy"] == 1.0 and curve[-1]["loss"] < curve[0]["loss"]


def test_collect_gives_each_decision_its_episode_return():
    model, router = routed_bank(chunk_size=4)
    router.trace, router.mode, router.generator = [], "sample", torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(torch.randint(3, 128, (3, 30), generator=torch.Generator().manual_seed(4)), bem_prompt_len=PROMPT,
              bem_side=_side())
    rows, returns = torch.tensor([2, 0, 1]), torch.tensor([0.1, 0.5, 0.9])  # batch row b holds episode rows[b]
    batch = collect(router.trace, rows, returns)
    allowed = torch.stack([d.allowed for d in router.trace])  # (J, B)
    assert len(batch.actions) == int(allowed.sum())
    expected = torch.cat([returns[rows[d.allowed]] for d in router.trace])
    assert torch.equal(batch.advantages, expected)
    assert torch.equal(batch.states, torch.cat([d.state[d.allowed] for d in router.trace]))

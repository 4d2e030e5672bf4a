"""The router's policy inside BEM's forward: action codes, hysteresis, the plan limit, causality."""
import pytest
import torch

from bem import BEMConfig, attach_bem, bem_layers
from bem.models import tiny
from bem.router.policy import Actions, Router, attach_router

PROMPT = 6


def routed_bank(arch="llama", max_switches=3, tau=0.0, seed=0, chunk_size=2) -> tuple[torch.nn.Module, Router]:
    """A tiny model with a 2-expert bank (rank 4) and a router with random weights, so actions change often."""
    sites = {"llama": ["o_proj", "down_proj"], "gpt2": ["attn.c_proj", "mlp.c_proj"]}[arch]
    model = attach_bem(tiny(arch, seed=seed), BEMConfig(rank=4, alpha=8.0, sites=sites, controller="chunk",
                                                        chunk_size=chunk_size, side_dim=3, experts=2,
                                                        max_switches=max_switches))
    router = attach_router(model, Actions(experts=2, rank=4), hidden=16, tau=tau)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.copy_(torch.randn(layer.U.shape, generator=gen) * 0.3)
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    return model, router


def _ids(batch=3, seq=40, seed=1):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _side(batch=3):
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(2))


def test_action_codes():
    actions = Actions(experts=2, rank=4, budgets=(1.0, 0.5), scales=(1.0, 2.0))
    assert len(actions) == 8
    expected = torch.tensor([[1, 1, 0, 0], [2, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0],
                             [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 1, 0], [0, 0, 2, 0]], dtype=torch.float32)
    assert torch.equal(actions.codes(), expected)
    for a in range(len(actions)):
        assert actions.index(*actions.unpack(a)) == a
    with pytest.raises(ValueError, match="divide rank"):
        Actions(experts=3, rank=4)
    with pytest.raises(ValueError, match="budgets"):
        Actions(experts=2, rank=4, budgets=(0.0,))
    with pytest.raises(ValueError, match="no action"):
        actions.index(2)


def test_sites_apply_the_action_code():
    """Every routed site runs with the code of the action in force: expert 1's code leaves block 0 unused."""
    model, router = routed_bank()
    ids = _ids(batch=1, seq=8)
    router.out.weight.data.zero_()
    router.out.bias.data.copy_(torch.tensor([0., 0., 0., 0., 9., 0., 0., 0.]))  # always expert 1, full, scale 1
    with torch.no_grad():
        routed = model(ids, bem_prompt_len=PROMPT, bem_side=_side(1)).logits
        mask = torch.tensor([[0., 0., 1., 1.]])  # the same as a static bank masked to block 1
        static = attach_bem(tiny("llama"), BEMConfig(rank=4, alpha=8.0, controller="static", experts=2))
        for (_, a), (_, b) in zip(sorted(bem_layers(model).items()), sorted(bem_layers(static).items())):
            b.U.copy_(a.U)
            b.V.copy_(a.V)
        expected = static(ids, bem_mask=mask).logits
    assert (routed - expected).abs().max().item() <= 1e-6


def _count_per_row(router: Router) -> torch.Tensor:
    return sum(d.switched.long() for d in router.trace if d.kind == "chunk")


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_plan_limit_holds_on_adversarial_values(limit):
    """Logits scripted to flip the best action at every chunk: no row switches more than the limit, in a full
    forward and in cached generation alike."""
    model, router = routed_bank(max_switches=limit)
    flips = iter(range(10_000))

    def adversarial(state):
        k = next(flips)
        out = torch.full((state.shape[0], len(router.actions)), -5.0)
        out[:, (k % 2) * 4] = 5.0  # expert 0 and expert 1 take turns being far better
        return out
    router.logits = adversarial
    router.trace = []
    with torch.no_grad():
        model(_ids(), bem_prompt_len=PROMPT, bem_side=_side())
    per_row = _count_per_row(router)
    assert per_row.max().item() == limit  # the limit binds (the script wants ~17 switches per row)
    assert torch.equal(model._bem_runtime.state.switches, per_row)
    wanted = sum((d.action != d.previous).long() for d in router.trace if d.kind == "chunk")
    assert wanted.min().item() > limit

    router.trace = []
    ids = _ids(seq=PROMPT)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                   pad_token_id=0, bem_prompt_len=PROMPT, bem_side=_side())
    assert _count_per_row(router).max().item() == limit


@pytest.mark.parametrize("tau", [0.0, 1.0, 3.0])
def test_hysteresis_switches_only_when_the_gain_exceeds_tau(tau):
    """Random logits at every decision and sampled actions: a switch happens exactly when the sampled action
    differs and log π(new) − log π(now) > tau (recomputed here from the scripted logits)."""
    model, router = routed_bank(max_switches=None, tau=tau)
    gen, scripted = torch.Generator().manual_seed(7), []

    def random_logits(state):
        scripted.append(torch.randn(state.shape[0], len(router.actions), generator=gen) * 3.0)
        return scripted[-1]
    router.logits = random_logits
    router.mode, router.generator = "sample", torch.Generator().manual_seed(3)
    router.trace = []
    with torch.no_grad():
        model(_ids(batch=4, seq=60), bem_prompt_len=PROMPT, bem_side=_side(4))
    assert len(scripted) == len(router.trace)
    checked = switches = blocked = 0
    for d, logits in zip(router.trace, scripted):
        if d.kind != "chunk":
            continue
        logp = torch.log_softmax(logits, -1)
        gain = logp.gather(-1, d.action[:, None]) - logp.gather(-1, d.previous[:, None])
        expected = d.allowed & (d.action != d.previous) & (gain.squeeze(-1) > tau)
        assert torch.equal(d.switched, expected)
        checked += int(d.allowed.sum())
        switches += int(d.switched.sum())
        blocked += int((d.allowed & (d.action != d.previous) & ~expected).sum())
    assert checked >= 40
    assert switches > 0 and blocked > 0  # both sides of the rule happened


def test_routing_is_causal_and_cached_generation_equals_full_forward():
    model, router = routed_bank(max_switches=3)
    ids, side = _ids(batch=2, seq=PROMPT), _side(2)
    router.trace = []
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30,
                         do_sample=False, pad_token_id=0, bem_prompt_len=PROMPT, bem_side=side, output_logits=True,
                         return_dict_in_generate=True)
    assert _count_per_row(router).min().item() >= 1  # the router really switched experts while generating
    with torch.no_grad():
        full = model(out.sequences, bem_prompt_len=PROMPT, bem_side=side).logits
        cached = torch.stack(out.logits, 1)
        assert (full[:, PROMPT - 1:-1] - cached).abs().max().item() <= 1e-4
        # a chunk's action depends only on earlier tokens: changing the tail leaves every earlier logit alone
        changed = out.sequences.clone()
        changed[:, 20:] = (changed[:, 20:] + 7) % 120 + 3
        again = model(changed, bem_prompt_len=PROMPT, bem_side=side).logits
    assert (again[:, :20] - full[:, :20]).abs().max().item() == 0.0
    assert (again[:, 20:] - full[:, 20:]).abs().max().item() > 1e-3


def test_generic_chunk_controller_obeys_the_plan_limit():
    """max_switches applies to the ordinary chunk controller too, and select_rows carries the count."""
    from conftest import routed_tiny

    model = routed_tiny("llama", max_switches=2)
    runtime = model._bem_runtime
    runtime.switches = 0
    with torch.no_grad():
        model(_ids(batch=2, seq=60), bem_prompt_len=PROMPT, bem_side=_side(2))
    assert runtime.state.switches.tolist() == [2, 2]
    assert runtime.switches == 4

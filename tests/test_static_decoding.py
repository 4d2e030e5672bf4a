"""Issue 14 item 2: greedy decoding on a static KV cache, with the decode step compiled (bem.decoding), computes
what `greedy` (a growing cache, finished rows leave) computes: the same tokens, logits within 1e-4, the same
routing (chunk-code switches), for every variant, ragged prompts, per-row limits, end tokens and padded batches."""
import pytest
import torch
from torch._dynamo.utils import counters

from bem import BEMConfig, attach_bem
from bem.decoding import StaticDecoder, decoder_for, resolve_decoding
from bem.errors import BEMError
from bem.evaluate import generate, greedy
from bem.models import tiny
from conftest import routed_tiny, variant_options

SIDE = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))


def _ragged():
    """Rows of 5, 9 and 7 real tokens, left-padded to 9."""
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    ids[2, :2], mask[2, :2] = 0, 0
    return ids, mask


def _recorded(decode, *args, **kwargs):
    """(tokens, logits of every step) of a decode call; `pick` sees each step's last logits."""
    seen = []

    def pick(logits):
        seen.append(logits[:3].clone())  # the batch's own rows (a padded batch has more)
        return logits.argmax(-1)

    return decode(*args, pick=pick, **kwargs), seen


def _both(model, limit, eos, **options):
    ids, mask = _ragged()
    kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": SIDE} if getattr(model, "_bem_runtime", None) else {}
    runtime = getattr(model, "_bem_runtime", None)
    if runtime is not None:
        runtime.switches = 0
    want, want_logits = _recorded(greedy, model, ids, mask, limit, eos, **kwargs)
    switches = runtime.switches if runtime is not None else 0
    if runtime is not None:
        runtime.switches = 0
    got, got_logits = _recorded(StaticDecoder(model), ids, mask, limit, eos, **options, **kwargs)
    return want, got, want_logits, got_logits, switches, runtime.switches if runtime is not None else 0


@pytest.mark.parametrize("variant", ["anchor", "pt1_head_gates", "v1_dynrank", "v2_gate_shaping", "v3_kron", "v4_film",
                                     "all"])
@pytest.mark.parametrize("options", [{"prefix_scope": "prompt"}, {"prefix_scope": "chunk", "hysteresis_tau": 0.01}])
def test_static_decoding_equals_greedy(arch, variant, options):
    model = routed_tiny(arch, **variant_options(arch, variant), **options)
    want, got, want_logits, got_logits, want_switches, got_switches = _both(model, 30, [-1], rows=4, length=50)
    assert got == want and all(len(t) == 30 for t in got)
    # the decode steps' logits (the first is the shared prefill's): rows that are still going in `greedy`
    for a, b in zip(want_logits[1:], got_logits[1:]):
        assert (a - b[:len(a)]).abs().max().item() <= 1e-4
    assert got_switches == want_switches
    if options["prefix_scope"] == "chunk":
        assert want_switches >= 10  # codes really switch while decoding, so the step's routing is exercised


@pytest.mark.parametrize("which", ["plain", "static_bem", "max_switches", "mask"])
def test_static_decoding_equals_greedy_without_routing_and_with_limits(arch, which):
    """The base model, static BEM (no controller), a switch budget, and an expert mask m per row."""
    if which == "plain":
        model = tiny(arch, seed=0)
    elif which == "static_bem":
        model = routed_tiny(arch, controller="static")
    else:
        model = routed_tiny(arch, prefix_scope="chunk", hysteresis_tau=0.01, max_switches=2)
    ids, mask = _ragged()
    kwargs = {}
    if which != "plain":
        kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": SIDE}
    if which == "mask":
        kwargs["bem_mask"] = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]])
    want = greedy(model, ids, mask, 24, [-1], **kwargs)
    assert StaticDecoder(model)(ids, mask, 24, [-1], rows=5, length=40, **kwargs) == want


def test_end_tokens_and_per_row_limits_end_rows_as_greedy_does(arch):
    model = routed_tiny(arch, prefix_scope="chunk", hysteresis_tau=0.01)
    ids, mask = _ragged()
    kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": SIDE}
    free = greedy(model, ids, mask, 20, [-1], **kwargs)
    eos = [free[0][3], free[2][6]]  # row 0 ends at its 4th token, row 2 by its 7th at the latest
    for limits in (20, [20, 5, 12]):
        want = greedy(model, ids, mask, limits, eos, **kwargs)
        assert min(map(len, want)) < 20  # rows really end early
        assert StaticDecoder(model)(ids, mask, limits, eos, **kwargs) == want


def test_compiled_step_is_one_graph_and_compiles_once_per_shape():
    """torch.compile (inductor on the CPU) of the decode step: the same tokens, one graph without breaks, and a second
    batch of the same (rows, length) reuses it."""
    torch._dynamo.reset()
    counters.clear()
    model = routed_tiny("llama", prefix_scope="chunk", hysteresis_tau=0.01)
    ids, mask = _ragged()
    kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": SIDE}
    want = greedy(model, ids, mask, 16, [-1], **kwargs)
    decoder = decoder_for(model, "compiled")
    assert decoder is decoder_for(model, "compiled") and decoder.compiled
    assert decoder(ids, mask, 16, [-1], rows=4, length=32, **kwargs) == want
    other = ids[1:].clone(), mask[1:].clone()
    assert decoder(*other, 16, [-1], rows=4, length=32, bem_prompt_len=other[1].sum(1), bem_side=SIDE[1:]) == \
        greedy(model, *other, 16, [-1], bem_prompt_len=other[1].sum(1), bem_side=SIDE[1:])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.fixture(scope="module")
def tokenizer():
    from bem.models import load_base

    return load_base("smollm2-135m")[1]


def test_generate_replies_do_not_depend_on_the_decoding_mode(tokenizer):
    model = tiny("llama", vocab_size=len(tokenizer))
    attach_bem(model, BEMConfig(rank=4, controller="chunk", chunk_size=3, side_dim=2, hysteresis_tau=0.01))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    prompts = ["Hi", "Translate this Spanish Bible verse into English: Jesús lloró.", "What is a dog?", "Why?", "Ok"]
    side = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    want = generate(model, tokenizer, prompts, [8, 12, 8, 3, 8], batch_size=2, side=side)
    assert any(want)
    assert generate(model, tokenizer, prompts, [8, 12, 8, 3, 8], batch_size=2, side=side, decoding="static") == want
    assert generate(model, tokenizer, prompts, [8, 12, 8, 3, 8], batch_size=3, side=side, decoding="auto") == want


def test_auto_and_router_modes(monkeypatch):
    from test_router_policy import routed_bank

    model = routed_tiny("llama")
    assert resolve_decoding(model, "auto") == "dynamic"  # the CPU: a decode step is compute-bound here
    assert resolve_decoding(model, "static") == "static"
    with pytest.raises(ValueError, match=r"decoding 'beam' is not a decoding mode; allowed: \['dynamic', 'static'"):
        resolve_decoding(model, "beam")
    with pytest.raises(ValueError, match="has no static decoder"):
        decoder_for(model, "dynamic")
    monkeypatch.setenv("BEM_AUTO_DECODING", "static")
    assert resolve_decoding(model, "auto") == "static"
    monkeypatch.setenv("BEM_AUTO_DECODING", "fast")
    with pytest.raises(BEMError, match=r"BEM_AUTO_DECODING='fast' is not allowed; expected one of \['dynamic', "
                       r"'static', 'compiled'\]"):
        resolve_decoding(model, "auto")
    monkeypatch.setenv("BEM_AUTO_DECODING", "compiled")
    router_model, _ = routed_bank()
    assert resolve_decoding(router_model, "auto") == "dynamic"
    with pytest.raises(ValueError, match="cannot decode a router"):
        resolve_decoding(router_model, "compiled")
    ids = torch.randint(3, 100, (1, 6))
    with pytest.raises(NotImplementedError, match="a router's decisions"):
        StaticDecoder(router_model)(ids, torch.ones_like(ids), 4, [-1], bem_prompt_len=6, bem_side=SIDE[:1])

"""SPEC §2 items 4 and 5: every decoding mode is right or refused, and routing state belongs to a stream."""
import pytest
import torch
from transformers import DynamicCache

from bem import bem_disabled, bem_layers
from conftest import routed_tiny

SIDE = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))


def _greedy(model, ids, new_tokens=24, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True, **kwargs)


def _left_padded():
    """Rows of 5 and 9 real tokens, the first left-padded with 4 pads."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask, torch.tensor([5, 9])


@pytest.mark.parametrize("scope", ["prompt", "chunk"])
def test_static_cache_left_padded_batch_equals_each_row_alone(arch, scope):
    model = routed_tiny(arch, prefix_scope=scope, hysteresis_tau=0.01)
    ids, mask, lengths = _left_padded()
    batch = _greedy(model, ids, attention_mask=mask, cache_implementation="static", bem_prompt_len=lengths, bem_side=SIDE)
    for row, n in enumerate(lengths.tolist()):
        alone = _greedy(model, ids[row:row + 1, -n:], bem_prompt_len=n, bem_side=SIDE[row:row + 1])
        assert torch.equal(batch.sequences[row, -24:], alone.sequences[0, -24:])
        diff = (torch.stack(batch.logits, 1)[row] - torch.stack(alone.logits, 1)[0]).abs().max().item()
        assert diff <= 1e-4


def test_4d_masks_equal_the_2d_mask(arch):
    """Bool and additive float 4-D masks of a left-padded batch route as its 2-D mask does, with or without
    bem_prompt_len, so pads never count as tokens."""
    model = routed_tiny(arch)
    ids, mask, lengths = _left_padded()
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    bool4d = (causal & mask.bool()[:, None, :])[:, None]  # (B, 1, T, T): keys that are pads are masked
    float4d = torch.zeros(bool4d.shape).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    real = mask.bool()
    for kwargs in ({"bem_prompt_len": lengths, "bem_side": SIDE}, {}):
        with torch.no_grad():
            want = model(ids, attention_mask=mask, **kwargs).logits
            for four_d in (bool4d, float4d):
                got = model(ids, attention_mask=four_d, **kwargs).logits
                assert (got - want)[real].abs().max().item() <= 1e-5


def test_4d_mask_that_cannot_mark_real_tokens_is_refused(arch):
    model = routed_tiny(arch)
    ids = torch.randint(3, 128, (1, 6))
    short = torch.ones(1, 1, 6, 4, dtype=torch.bool)  # 4 key positions for 6 tokens
    with pytest.raises(ValueError, match=r"does not tell BEM which of the call's 6 tokens"):
        model(ids, attention_mask=short)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_speculative_decoding_equals_plain_greedy(arch, mode):
    """Drafts are cropped from the cache; the routing state rolls back with it, so the tokens are plain greedy's
    and the logits those of a full forward. The assistant is a second BEM model with its own rolled-back stream."""
    model = routed_tiny(arch, hysteresis_tau=0.01)
    runtime = model._bem_runtime
    ids = torch.tensor([[7, 7, 8, 7, 7, 9, 7, 7, 10, 7]])  # repeats, so prompt lookup drafts (and misses)
    kwargs = {"attention_mask": torch.ones_like(ids), "bem_prompt_len": 10, "bem_side": SIDE[:1]}
    runtime.switches = 0
    plain = _greedy(model, ids, 30, **kwargs)
    plain_switches, runtime.switches = runtime.switches, 0
    rollbacks, roll_back = [], runtime._roll_back
    runtime._roll_back = lambda st, length: (rollbacks.append(st.length - length), roll_back(st, length))
    extra = {"prompt_lookup_num_tokens": 3} if mode == "prompt_lookup" else \
        {"assistant_model": routed_tiny(arch, seed=3, hysteresis_tau=0.01)}
    drafted = _greedy(model, ids, 30, **kwargs, **extra)
    assert sum(rollbacks) >= 2  # drafts really were rejected and cropped
    assert torch.equal(drafted.sequences, plain.sequences)
    assert runtime.switches == plain_switches >= 4  # switches of rejected drafts are taken back
    with torch.no_grad():
        full = model(drafted.sequences, bem_prompt_len=10, bem_side=SIDE[:1]).logits
    assert (full[:, 9:-1] - torch.stack(drafted.logits, 1)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("scope", ["prompt", "chunk"])
def test_crop_then_different_tokens_equals_full_forward(arch, scope):
    """A call of 7 tokens crossing chunk boundaries, cropped to its first 2, continued with other tokens."""
    model = routed_tiny(arch, prefix_scope=scope, hysteresis_tau=0.01)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    draft = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True, bem_prompt_len=6)
        cache, pieces = out.past_key_values, [out.logits]
        pieces.append(model(torch.cat([ids[:, 6:8], draft[:, 2:]], 1), past_key_values=cache).logits[:, :2])
        cache.crop(-5)  # keep the draft call's first 2 tokens
        for at, end in ((8, 13), (13, 18), (18, 20)):
            pieces.append(model(ids[:, at:end], past_key_values=cache).logits)
        full = model(ids, bem_prompt_len=6).logits
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-4


def test_crop_past_the_kept_calls_or_regrown_cache_is_refused():
    model = routed_tiny("llama")
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True, bem_prompt_len=6).past_key_values
        for at in range(6, 10):
            model(ids[:, at:at + 1], past_key_values=cache)
        with bem_disabled(model):
            model(ids[:, 10:11], past_key_values=cache)
        with pytest.raises(RuntimeError, match="holds 11 positions but BEM's routing state for it has processed 10"):
            model(ids[:, 11:12], past_key_values=cache)
        cache.crop(-3)  # to 8 positions
        model(ids[:, 8:9], past_key_values=cache)  # back inside a kept call: fine
        model._bem_runtime.streams[cache].history = model._bem_runtime.streams[cache].history[-1:]
        cache.crop(-2)  # to 7, before the one call kept
        with pytest.raises(RuntimeError, match="only into its last 64 calls"):
            model(ids[:, 7:8], past_key_values=cache)


def test_refeeding_other_prompt_tokens_after_a_crop_is_refused():
    model = routed_tiny("llama")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = model(ids, use_cache=True, bem_prompt_len=6).past_key_values
        cache.crop(-1)
        model(ids[:, 5:], past_key_values=cache)  # the prompt's own last token: allowed (generate does this)
        cache.crop(-1)
        with pytest.raises(RuntimeError, match="not the prompt's own"):
            model((ids[:, 5:] + 1) % 125 + 3, past_key_values=cache)


def test_interleaved_streams_each_equal_their_run_alone(arch):
    """Two streams on one model, stepped A, B, A, B, ...: each gives exactly what it gives alone."""
    model = routed_tiny(arch, hysteresis_tau=0.01)
    prompts = [torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 8)]

    def start(i):
        out = model(prompts[i], use_cache=True, bem_prompt_len=prompts[i].shape[1], bem_side=SIDE[i:i + 1])
        return out.past_key_values, [out.logits[:, -1]]

    def step(cache, logits):
        logits.append(model(logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True).logits[:, -1])

    with torch.no_grad():
        alone = []
        for i in range(2):
            cache, logits = start(i)
            for _ in range(14):
                step(cache, logits)
            alone.append(torch.stack(logits))
        streams = [start(0), start(1)]
        for _ in range(14):
            for cache, logits in streams:
                step(cache, logits)
    for i, (_, logits) in enumerate(streams):
        assert (torch.stack(logits) - alone[i]).abs().max().item() <= 1e-6
    assert (alone[0] - alone[1]).abs().max() > 1e-2  # the streams really differ


def test_cached_call_without_routing_state_is_refused(arch):
    model = routed_tiny(arch)
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        with bem_disabled(model):
            cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="no BEM routing state for this cache: it holds 6 positions"):
            model(ids[:, :1], past_key_values=cache)
        with pytest.raises(TypeError, match="needs a transformers Cache; got tuple"):
            model(ids[:, :1], past_key_values=((torch.zeros(1),),))
        model(ids, past_key_values=DynamicCache())  # an empty cache starts a stream


@pytest.mark.parametrize("options,name", [({"num_beams": 2}, "beam_search"),
                                          ({"num_beams": 2, "do_sample": True}, "beam_sample"),
                                          ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive_search"),
                                          ({"dola_layers": "low"}, "dola_generation"),
                                          ({"assistant_early_exit": 1}, "assistant_early_exit")])
def test_unsupported_modes_are_refused_by_name(options, name):
    model = routed_tiny("llama")
    with pytest.raises(NotImplementedError, match=name):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, pad_token_id=0, **options)


@pytest.mark.parametrize("options", [{}, {"prefix_scope": "chunk", "hysteresis_tau": 0.01}, {"controller": "static"},
                                     {"dynamic_rank": 2, "head_groups": 2}])
def test_greedy_that_drops_finished_rows_equals_generate(arch, options):
    """bem.evaluate.greedy drops rows from the batch, KV cache and routing state as they end; every row's tokens
    (and so every reply) equal generate's, which computes finished rows to the end."""
    from bem.evaluate import greedy

    model = routed_tiny(arch, **options)
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    for row, pads in enumerate((4, 0, 2, 6)):
        ids[row, :pads], mask[row, :pads] = 0, 0
    kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": torch.randn(4, 3, generator=torch.Generator().manual_seed(7))}
    free = _greedy(model, ids, new_tokens=14, attention_mask=mask, **kwargs).sequences[:, 9:]
    # an end token that rows reach at different steps: row 0's 3rd token
    end = int(free[0, 2])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0,
                          eos_token_id=end, **kwargs)[:, 9:]
    got = greedy(model, ids, mask, 14, [end], **kwargs)
    lengths = [len(row) for row in got]
    assert lengths[0] <= 3 and max(lengths) > lengths[0]  # row 0 left the batch early, another row went on
    for row, tokens in enumerate(got):
        expect = want[row].tolist()
        expect = expect[:expect.index(end) + 1] if end in expect else expect
        assert tokens == expect, f"row {row}"


def test_per_row_limits_equal_each_limit_alone(arch):
    """Prompts of several tasks in one call (bem.online's serving step): with one limit per row, every reply is
    what the call with that row's limit gives, and rows stop at their own limits."""
    from bem.evaluate import greedy

    model = routed_tiny(arch, prefix_scope="chunk", hysteresis_tau=0.01)
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": torch.randn(4, 3, generator=torch.Generator().manual_seed(7))}
    limits = [3, 12, 1, 7]
    got = greedy(model, ids, mask, limits, [-1], **kwargs)  # no end token: every row runs to its limit
    full = greedy(model, ids, mask, 12, [-1], **kwargs)
    assert [len(row) for row in got] == limits
    assert all(tokens == full[row][:limit] for row, (tokens, limit) in enumerate(zip(got, limits)))


def test_nucleus_samples_only_the_nucleus_in_proportion():
    """Known answer: p = (0.5, 0.3, 0.15, 0.05) with top_p = 0.8 keeps the first two tokens, drawn 5:3; top_p → 0 is
    the argmax; temperature sharpens as softmax(logits / T); the same seed draws the same tokens."""
    from bem.evaluate import nucleus

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20_000, 4)
    draws = nucleus(1.0, 0.8, torch.Generator().manual_seed(0))(logits)
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.015)
    cold = nucleus(0.5, 1.0, torch.Generator().manual_seed(0))(logits)  # p ∝ (25, 9, 2.25, 0.25)
    assert (cold == 0).float().mean().item() == pytest.approx(25 / 36.5, abs=0.015)
    wide = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(nucleus(1.0, 1e-6, torch.Generator())(wide), wide.argmax(-1))
    again = nucleus(1.0, 0.8, torch.Generator().manual_seed(0))(logits)
    assert torch.equal(draws, again)
    for bad in ((0.0, 0.9), (1.0, 0.0), (1.0, 1.5)):
        with pytest.raises(ValueError, match="temperature > 0 and 0 < top_p"):
            nucleus(*bad)


def test_sampled_decoding_with_dropped_rows_draws_from_each_rows_own_distribution(arch):
    """Sampling through greedy(pick=nucleus): rows leave the batch as they end, and every sampled token lies in the
    nucleus of the full (uncached) forward of its own row's prefix: the cache and routing state stay right."""
    from bem.evaluate import greedy, nucleus

    model = routed_tiny(arch, prefix_scope="chunk", hysteresis_tau=0.01)
    ids = torch.randint(3, 128, (6, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    for row, pads in enumerate((3, 0, 2, 5, 1, 0)):
        ids[row, :pads], mask[row, :pads] = 0, 0
    kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": torch.randn(6, 3, generator=torch.Generator().manual_seed(7))}
    temperature, top_p = 0.3, 0.6
    got = greedy(model, ids, mask, 10, [5, 9, 17], pick=nucleus(temperature, top_p, torch.Generator().manual_seed(3)),
                 **kwargs)
    assert min(len(r) for r in got) < max(len(r) for r in got)  # some rows ended before others
    for row, tokens in enumerate(got):
        pads = int((mask[row] == 0).sum())
        prompt = ids[row, pads:]
        for t, token in enumerate(tokens):
            seq = torch.cat([prompt, torch.tensor(tokens[:t], dtype=torch.long)]).unsqueeze(0)
            with torch.no_grad():
                logits = model(input_ids=seq, bem_prompt_len=torch.tensor([len(prompt)]),
                               bem_side=kwargs["bem_side"][row:row + 1]).logits[0, -1]
            p, order = torch.softmax(logits / temperature, -1).sort(descending=True)
            allowed = order[(p.cumsum(-1) - p) < top_p + 1e-4].tolist()
            assert token in allowed, f"row {row} step {t}"


def test_select_rows_keeps_the_remaining_rows_routing():
    """After dropping rows, the stream state of the kept rows is exactly the state they would have alone."""
    model = routed_tiny("llama", prefix_scope="chunk", hysteresis_tau=0.01)
    runtime = model._bem_runtime
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(8))
    side = torch.randn(3, 3, generator=torch.Generator().manual_seed(9))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, bem_side=side)
    keep = torch.tensor([0, 2])
    cache.batch_select_indices(keep)
    runtime.select_rows(cache, keep)
    kept = runtime.streams[cache]
    alone_cache = DynamicCache()
    with torch.no_grad():
        model(ids[keep], past_key_values=alone_cache, use_cache=True, bem_side=side[keep])
    alone = runtime.streams[alone_cache]
    for name in ("chunk", "code", "window_sum", "window_count", "seen", "prompt_len", "side"):
        assert torch.allclose(getattr(kept, name).float(), getattr(alone, name).float(), atol=1e-6), name
    with torch.no_grad():  # and the next cached step continues both alike
        step = torch.randint(3, 128, (2, 1), generator=torch.Generator().manual_seed(10))
        a = model(step, past_key_values=cache, use_cache=True, bem_side=side[keep]).logits
        b = model(step, past_key_values=alone_cache, use_cache=True, bem_side=side[keep]).logits
    assert (a - b).abs().max().item() <= 1e-5


def _decode_ops(model, kwargs) -> int:
    """Top-level aten operator calls of one cached decode step after a 6-token prompt."""
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True, **kwargs)
        token = out.logits[:, -1:].argmax(-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(token, past_key_values=out.past_key_values, use_cache=True)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


def test_a_routed_decode_step_adds_few_operator_calls_per_site():
    """On a GPU each operator call is a launch and the decode step is launch-bound (docs/perf.md): a routed site adds
    its two matmuls, the code's product and the sum, and nothing per call for an absent trust region, a one-segment
    gather or same-dtype casts (17 top-level calls a site before, 10 after; docs/perf.md)."""
    kwargs = {"bem_prompt_len": torch.tensor([6, 6]), "bem_side": torch.randn(2, 3)}
    counts = {}
    for sites in (["o_proj"], ["o_proj", "down_proj"]):  # 2 and 4 sites: the difference is per site
        model = routed_tiny("llama", prefix_scope="prompt", sites=sites)
        counts[len(bem_layers(model))] = _decode_ops(model, kwargs)
    assert (counts[4] - counts[2]) / 2 <= 10, counts

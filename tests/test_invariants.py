"""Disabled = base, frozen base, save/load, merge/unmerge, mixed batch = each alone."""
import torch

from bem import BEMConfig, attach_bem, bem_disabled, bem_layers, load_bem, save_bem
from bem.models import tiny

from conftest import SITES, routed_tiny


def _ids(batch=2, seq=16, seed=0):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_disabled_equals_base_exactly(arch):
    ids = _ids()
    base = tiny(arch)(ids).logits
    model = routed_tiny(arch)
    with torch.no_grad():
        routed = model(ids, bem_prompt_len=5, bem_side=torch.randn(2, 3)).logits
        with bem_disabled(model):
            disabled = model(ids).logits
    assert (routed - base).abs().max() > 1e-3
    assert torch.equal(disabled, base)


def test_optimizer_step_changes_only_module_parameters(arch):
    model = routed_tiny(arch)
    before = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".U" in n or ".V" in n or "bem_controller" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    loss = model(ids, labels=ids, bem_prompt_len=4, bem_side=torch.randn(2, 3)).loss
    loss.backward()
    opt.step()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    base_keys = [k for k in tiny(arch).state_dict()]
    assert base_keys and all(torch.equal(before[k], after[k]) for k in base_keys)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)


def test_save_load_round_trip_reproduces_logits_exactly(arch, tmp_path):
    model = routed_tiny(arch, tau_sigma=0.5, tau_fro=1.0)
    ids, side = _ids(), torch.randn(2, 3)
    with torch.no_grad():
        expected = model(ids, bem_prompt_len=6, bem_side=side).logits
    save_bem(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["bem_config.json", "bem_weights.safetensors"]
    fresh = load_bem(tiny(arch), tmp_path / "ckpt")
    with torch.no_grad():
        got = fresh(ids, bem_prompt_len=6, bem_side=side).logits
    assert torch.equal(got, expected)


def test_load_onto_other_base_is_an_error(tmp_path):
    save_bem(routed_tiny("llama"), tmp_path / "ckpt")
    try:
        load_bem(tiny("gpt2"), tmp_path / "ckpt")
    except ValueError as err:
        assert "bem_config.json" in str(err) and "saved for base" in str(err)
    else:
        raise AssertionError("loading a llama checkpoint onto gpt2 must fail")


def test_merge_unmerge_exact(arch):
    model = attach_bem(tiny(arch), BEMConfig(rank=4, sites=SITES[arch], controller="static", tau_fro=0.2))
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.normal_(0, 0.3)
    ids = _ids()
    weights = {n: l.base_layer.weight.clone() for n, l in bem_layers(model).items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        for layer in bem_layers(model).values():
            layer.merge()
        merged = model(ids).logits
        for layer in bem_layers(model).values():
            layer.unmerge()
    assert (merged - unmerged).abs().max() <= 1e-5
    assert all(torch.equal(l.base_layer.weight, weights[n]) for n, l in bem_layers(model).items())


def test_mixed_batch_equals_each_sequence_alone(arch):
    """Different lengths (right padding), prompts and side inputs per sequence: codes differ per row."""
    model = routed_tiny(arch)
    lengths, prompts = [18, 11, 14], [5, 3, 9]
    side = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    ids = _ids(3, 18, seed=4)
    mask = torch.zeros(3, 18, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, bem_prompt_len=torch.tensor(prompts), bem_side=side).logits
        codes = []
        for i, n in enumerate(lengths):
            alone = model(ids[i:i + 1, :n], bem_prompt_len=prompts[i], bem_side=side[i:i + 1]).logits
            codes.append(model._bem_runtime.state.code)
            assert (batch[i, :n] - alone[0]).abs().max() <= 1e-5
    assert (codes[0] - codes[1]).abs().max() > 1e-3  # the rows really were routed differently


def test_mask_selects_basis_directions(arch):
    """Static BEM with mask m equals LoRA of rank k built from the kept columns of U and V."""
    model = attach_bem(tiny(arch), BEMConfig(rank=4, alpha=8, sites=SITES[arch], controller="static"))
    small = attach_bem(tiny(arch), BEMConfig(rank=2, alpha=4, sites=SITES[arch], controller="static"))  # same s = 2
    keep = torch.tensor([0, 2])
    with torch.no_grad():
        for (name, layer), other in zip(bem_layers(model).items(), bem_layers(small).values()):
            layer.U.normal_(0, 0.3)
            other.U.copy_(layer.U[:, keep])
            other.V.copy_(layer.V[:, keep])
        ids = _ids()
        mask = torch.tensor([[1.0, 0, 1, 0]] * 2)
        masked = model(ids, bem_mask=mask).logits
        assert (masked - small(ids).logits).abs().max() <= 1e-5
        assert torch.equal(model(ids, bem_mask=torch.ones(2, 4)).logits, model(ids).logits)
        assert torch.equal(model(ids, bem_mask=torch.zeros(2, 4)).logits, tiny(arch)(ids).logits)


def test_per_example_masks_with_routed_codes_equal_each_alone(arch):
    model = routed_tiny(arch)
    ids, side = _ids(2, 14, seed=8), torch.randn(2, 3)
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 1]])
    with torch.no_grad():
        batch = model(ids, bem_prompt_len=5, bem_side=side, bem_mask=mask).logits
        for i in range(2):
            alone = model(ids[i:i + 1], bem_prompt_len=5, bem_side=side[i:i + 1], bem_mask=mask[i:i + 1]).logits
            assert (batch[i] - alone[0]).abs().max() <= 1e-5
        unmasked = model(ids, bem_prompt_len=5, bem_side=side).logits
    assert (unmasked - batch).abs().max() > 1e-3

"""c ≡ 1 is LoRA: BEM's static controller equals PEFT's LoRA with the same A/B."""
import torch
from peft import LoraConfig, get_peft_model

from bem import BEMConfig, attach_bem, bem_layers
from bem.models import tiny

from conftest import SITES


def test_static_bem_equals_peft_lora(arch):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(
        tiny(arch),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                   target_modules=["o_proj", "down_proj"] if arch == "llama" else ["c_proj"],
                   fan_in_fan_out=arch == "gpt2"),
    )
    ours = attach_bem(tiny(arch), BEMConfig(rank=4, alpha=8, sites=SITES[arch], controller="static"))
    peft_modules = dict(peft_model.named_modules())
    copied = 0
    with torch.no_grad():
        for name, layer in bem_layers(ours).items():
            lora = peft_modules[f"base_model.model.{name}"]
            layer.U.copy_(lora.lora_B["default"].weight)
            layer.V.copy_(lora.lora_A["default"].weight.T)
            copied += 1
        assert copied == 4  # 2 blocks x 2 sites
        expected = peft_model(ids).logits
        got = ours(ids).logits
    assert expected.abs().max() > 0
    assert (expected - tiny(arch)(ids).logits).abs().max() > 1e-3  # the adapter really changes the output
    assert (got - expected).abs().max().item() <= 1e-5


def test_greedy_reaches_through_a_peft_wrapper():
    """A PEFT model's forward takes **kwargs: the cache, position ids and logits_to_keep still reach its base model
    under their own names (no deprecated `past_key_values`), and a left-padded batch decodes as each row alone."""
    import warnings

    from bem.evaluate import cache_name, forward_parameters, greedy

    peft_model = get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                          target_modules=["o_proj", "down_proj"])).eval()
    assert {"position_ids", "logits_to_keep"} <= set(forward_parameters(peft_model))
    assert cache_name(peft_model) == "cache"
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = greedy(peft_model, ids, mask, 8, eos=[127])
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    for row, start in enumerate((4, 0)):
        alone = greedy(peft_model, ids[row:row + 1, start:], mask[row:row + 1, start:], 8, eos=[127])
        assert batch[row] == alone[0]

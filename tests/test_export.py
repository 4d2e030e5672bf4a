"""export_peft: a constant-code BEM or one expert of a bank, loaded by PEFT, gives BEM's logits."""
import pytest
import torch
from peft import PeftModel

from bem import BEMConfig, attach_bem, bem_layers
from bem.export import export_peft
from bem.models import tiny

SITES = {"llama": ["o_proj", "down_proj"], "gpt2": ["attn.c_proj", "mlp.c_proj"]}


def trained_like(arch, **options):
    model = attach_bem(tiny(arch), BEMConfig(rank=4, alpha=8.0, sites=SITES[arch], **options))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.copy_(torch.randn(layer.U.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("what", ["all", "expert", "code", "trust_region"])
def test_peft_round_trip_gives_the_same_logits(tmp_path, arch, what):
    options = {"controller": "static", "experts": 2 if what == "expert" else 1}
    if what == "trust_region":
        options["tau_fro"] = 0.05  # binds for these weights: the exported factor must be folded in
    model = trained_like(arch, **options)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    kwargs, mask = {}, None
    if what == "expert":
        kwargs, mask = {"expert": 1}, torch.tensor([[0., 0., 1., 1.]] * 2)
    elif what == "code":
        code = torch.tensor([0.5, 0.0, 2.0, 1.0])
        kwargs, mask = {"code": code}, code.expand(2, -1)
    with torch.no_grad():
        expected = model(ids, bem_mask=mask).logits if mask is not None else model(ids).logits
        base = tiny(arch)(ids).logits
    folder = export_peft(model, tmp_path / "adapter", **kwargs)
    peft_model = PeftModel.from_pretrained(tiny(arch), folder)
    with torch.no_grad():
        got = peft_model(ids).logits
    assert (expected - base).abs().max().item() > 1e-3  # the adapter really changes the output
    assert (got - expected).abs().max().item() <= 1e-5


def test_what_peft_cannot_express_is_refused(tmp_path):
    with pytest.raises(ValueError, match="routed"):
        export_peft(trained_like("llama", controller="chunk"), tmp_path / "a")
    with pytest.raises(ValueError, match="head_groups"):
        export_peft(trained_like("llama", controller="chunk", head_groups=2), tmp_path / "b", code=torch.ones(4))
    with pytest.raises(ValueError, match="experts 0..1"):
        export_peft(trained_like("llama", controller="static", experts=2), tmp_path / "c", expert=2)
    with pytest.raises(ValueError, match="zero everywhere"):
        export_peft(trained_like("llama", controller="static"), tmp_path / "d", code=torch.zeros(4))

"""Bad options give one error naming the field, the value and what is allowed."""
import pytest
import torch

from bem import BEMConfig, BEMConfigError, attach_bem
from bem.models import tiny

from conftest import routed_tiny


@pytest.mark.parametrize("field,value,allowed", [
    ("rank", 0, "integer >= 1"),
    ("controller", "dynamic", "one of ('static', 'prefix', 'chunk')"),
    ("prefix_scope", "all", "one of ('prompt', 'chunk')"),
    ("chunk_size", -4, "integer >= 1"),
    ("tau_sigma", -1.0, "number > 0"),
    ("hysteresis_tau", -0.1, "number >= 0"),
])
def test_bad_value_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(BEMConfigError) as err:
        BEMConfig(**{field: value})
    message = str(err.value)
    assert f"BEMConfig.{field} = {value!r}" in message and allowed in message


def test_unknown_field_and_source_file_are_named():
    with pytest.raises(BEMConfigError, match=r"exp\.yaml: unknown BEMConfig field\(s\) \['rnak'\]"):
        BEMConfig.from_dict({"rnak": 4}, source="exp.yaml")
    with pytest.raises(BEMConfigError, match=r"exp\.yaml: BEMConfig.alpha = -2"):
        BEMConfig.from_dict({"alpha": -2}, source="exp.yaml")


def test_prefix_controller_with_chunk_scope_is_rejected():
    with pytest.raises(BEMConfigError, match="controller='chunk'"):
        BEMConfig(controller="prefix", prefix_scope="chunk")


def test_sites_matching_nothing_lists_layer_names():
    with pytest.raises(BEMConfigError, match=r"matches no linear layer.*o_proj"):
        attach_bem(tiny("llama"), BEMConfig(sites=["c_proj"]))


def test_read_layer_beyond_blocks_and_double_attach():
    with pytest.raises(BEMConfigError, match="read_layer = 5"):
        attach_bem(tiny("llama"), BEMConfig(read_layer=5))
    model = attach_bem(tiny("llama"), BEMConfig())
    with pytest.raises(ValueError, match="already attached"):
        attach_bem(model, BEMConfig())


def test_bad_side_input_shape():
    model = routed_tiny("llama")
    with pytest.raises(ValueError, match=r"bem_side must have shape \(batch, side_dim\) = \(1, 3\)"):
        model(torch.tensor([[5, 6, 7]]), bem_side=torch.zeros(1, 4))


def test_sites_before_read_layer_are_static():
    model = routed_tiny("llama", read_layer=1)
    indices = [m.site_index for m in model.modules() if hasattr(m, "site_index")]  # in module order
    assert indices == [None, None, 0, 1]

"""Integration tests on the real embedded SmolLM2-135M-Instruct, at tiny budgets."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bem import BEMConfig, attach_bem
from bem.data.batches import Example, collate, encode
from bem.data.wordnet import read_synsets
from bem.models import align_eos, embedded_path, load_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return load_base("smollm2-135m")


def test_loads_offline_and_answers(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == 134_515_008
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_training_targets_end_with_the_token_generation_stops_on(smollm2):
    """transformers 5.17 reads the embedded GGUF's tokenizer with eos = <|im_start|> while the model stops on
    <|im_end|>: units trained on such a tokenizer learned to end with <|im_start|> and never stopped."""
    from transformers import AutoTokenizer

    model, tok = smollm2
    assert tok.eos_token_id == model.generation_config.eos_token_id == 2
    (row,) = encode(tok, [Example("Define the word: cat", "a small feline")])
    assert row.ids[-1] == 2
    wrong = AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    wrong.eos_token = "<|im_start|>"  # what transformers 5.17 reads from the GGUF
    assert encode(wrong, [Example("Define the word: cat", "a small feline")])[0].ids[-1] == 1
    align_eos(model, wrong, "test")
    assert wrong.eos_token_id == 2
    assert encode(wrong, [Example("Define the word: cat", "a small feline")])[0].ids[-1] == 2


def test_bem_training_lowers_loss_on_real_data(smollm2):
    base, tok = smollm2
    model, _ = load_base("smollm2-135m")  # a fresh copy: attach_bem changes the model in place
    attach_bem(model, BEMConfig(rank=8, alpha=16, controller="chunk", chunk_size=8))
    glosses = [s for s in read_synsets("n")[2000:2100] if len(s.definition.split()) < 12][:4]
    batch = collate(tok, [Example(f"Define the word: {s.lemmas[0]}", s.definition) for s in glosses])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    with torch.no_grad():
        before = model(**batch).loss.item()
    torch.manual_seed(0)
    for _ in range(6):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.3, (before, after)
    frozen = dict(base.named_parameters())
    assert all(torch.equal(p, frozen[n.replace(".base_layer", "")])
               for n, p in model.named_parameters() if not p.requires_grad)


def test_readme_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python example\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs/example-adapter/bem_weights.safetensors").is_file()


def test_local_folder_loads_like_the_embedded_name(smollm2, tmp_path):
    from bem.models import embedded_path

    model, _ = load_base(str(embedded_path("smollm2-135m")))
    ids = torch.tensor([[19556, 905, 28, 253]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2[0](ids).logits)
    with pytest.raises(FileNotFoundError, match="neither an embedded name"):
        load_base(str(tmp_path / "missing"))


def test_collate_masks_prompt_and_padding_and_carries_side(smollm2):
    from bem.data.batches import Example, collate, prompt_ids

    _, tok = smollm2
    examples = [Example("Define the word: dog", "a domesticated canine", side=(0.5, 1.0)),
                Example("Translate: hola", "hello", side=(0.1, 0.2))]
    batch = collate(tok, examples)
    for i, ex in enumerate(examples):
        n_prompt = len(prompt_ids(tok, ex.prompt))
        assert batch["bem_prompt_len"][i] == n_prompt
        assert (batch["labels"][i, :n_prompt] == -100).all()
        target = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(target) == ex.target + tok.eos_token
        n = int(batch["attention_mask"][i].sum())
        assert (batch["labels"][i, n:] == -100).all() and batch["attention_mask"][i, :n].all()
    assert batch["bem_side"].tolist() == [[0.5, 1.0], [0.10000000149011612, 0.20000000298023224]]
    with pytest.raises(ValueError, match="every example"):
        collate(tok, [examples[0], Example("x", "y")])


def test_static_cache_decoding_gives_the_same_replies_on_the_real_model():
    """evaluation.decoding static (a static KV cache, every batch one shape) against dynamic (finished rows leave) on
    SmolLM2 with routed BEM whose codes switch while decoding: the same replies. (`compiled` is the same step under
    torch.compile; compiling the 30 blocks takes minutes on 2 cores, so it is checked on tiny models here and on the real
    model by `python scripts/eval_throughput.py --paths dynamic static compiled`.)"""
    from bem.evaluate import generate
    from bem.tasks import SPECS, load_items

    model, tok = load_base("smollm2-135m")
    attach_bem(model, BEMConfig(rank=8, alpha=16, controller="chunk", chunk_size=8, side_dim=0, hysteresis_tau=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith(".U") or name.startswith("bem_controller.out")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)  # small: replies change, stay text
    spec = SPECS["bible_translate"]
    prompts = [spec.prompt(it) for it in load_items("bible_translate", "test", 5)]
    runtime = model._bem_runtime
    runtime.switches = 0
    want = generate(model, tok, prompts, 24, batch_size=3)
    switches, runtime.switches = runtime.switches, 0
    assert generate(model, tok, prompts, 24, batch_size=3, decoding="static") == want
    assert runtime.switches == switches > 0

"""`bem bench` runs every kind of subject and reports ratios against the base measured in the same run."""
import json

import pytest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from bem.models import load_base, tiny

    root = tmp_path_factory.mktemp("bench") / "model"
    tokenizer = load_base("smollm2-135m")[1]
    tiny("llama", vocab_size=len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_bench_measures_each_subject_and_precision_with_ratios_to_the_base(tiny_model, tmp_path):
    from bem import bench

    subjects = ["base", "peft_lora", "peft_lora_merged", "bem_static", "bem_routed"]
    result = bench.bench(subjects, ("fp32", "bf16"), "cpu", model_name=str(tiny_model), batch=2, prompt_len=16,
                         decode_steps=2, new_tokens=4, train_len=16, rounds=1, warmup=0, log=lambda line: None)
    rows = {(r["subject"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {(s, p) for s in subjects for p in ("fp32", "bf16")}
    for (subject, precision), row in rows.items():
        assert row["prefill_ms"] > 0 and row["decode_ms"] > 0 and row["generate_tokens_per_s"] > 0
        assert row["ratios"]["prefill"] == pytest.approx(row["prefill_ms"] / rows[("base", precision)]["prefill_ms"])
        trains = subject not in ("base", "peft_lora_merged")
        assert (row["train_step_s"] is not None) == trains
        assert ("train_vs_peft_lora" in row["ratios"]) == trains
    assert rows[("base", "fp32")]["ratios"]["decode"] == 1.0
    path = tmp_path / "bench.json"
    bench.write(result, path)
    assert json.loads(path.read_text()) == result
    text = path.with_suffix(".md").read_text()
    assert "| bem_routed |" in text and "BEM routed decode ×" in text and "(goal ≤ ×1.10)" in text


def test_merged_peft_lora_computes_what_unmerged_does(tiny_model):
    """The merged subject is the same function as the unmerged one, so its speed is a fair comparison."""
    import torch

    from bem import bench

    unmerged = bench.build("peft_lora", str(tiny_model), torch.device("cpu"))[0].eval()
    merged = bench.build("peft_lora_merged", str(tiny_model), torch.device("cpu"))[0].eval()
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-4, rtol=1e-4)


def test_perf_doc_shows_the_stored_cpu_bench():
    """docs/perf.md's table is what `bem bench` wrote to docs/perf/bench-cpu.json, not typed by hand."""
    from pathlib import Path

    from bem import bench

    repo = Path(__file__).resolve().parents[1]
    result = json.loads((repo / "docs/perf/bench-cpu.json").read_text())
    assert bench.markdown(result) in (repo / "docs/perf.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--device", "gpu"], "--device 'gpu' is not allowed; expected cpu, cuda or cuda:N"),
    (["--subjects", "nope"], "--subjects: unknown ['nope']; expected some of"),
    (["--rounds", "0"], "--rounds: 0 is not allowed; expected an integer >= 1"),
])
def test_bad_bench_options_are_one_line_errors(args, message, capsys):
    from bem.cli import main

    with pytest.raises(SystemExit) if args[0] == "--rounds" else _nothing():
        assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_bench_modes_have_ratios_to_the_base_in_the_same_mode(tiny_model):
    """Compiled rows are measured against the compiled base (the plumbing, with torch.compile's aot_eager backend to
    keep the test short; `bem bench --modes compiled` uses inductor)."""
    from bem import bench

    result = bench.bench(["base", "bem_routed"], ("fp32",), "cpu", model_name=str(tiny_model), batch=2, prompt_len=8,
                         decode_steps=2, new_tokens=3, train_len=8, rounds=1, warmup=1, log=lambda line: None,
                         modes=("eager", "compiled"), compile_backend="aot_eager")
    rows = {(r["subject"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(s, m) for s in ("base", "bem_routed") for m in ("eager", "compiled")}
    for (subject, mode), row in rows.items():
        assert row["ratios"]["decode"] == pytest.approx(row["decode_ms"] / rows[("base", mode)]["decode_ms"])
    text = bench.markdown(result)
    assert "**fp32**" in text and "**fp32 compiled**" in text and "fp32 compiled: BEM routed decode ×" in text
    with pytest.raises(Exception, match=r"--modes: \['jit'\] not allowed"):
        bench.bench(["base"], ("fp32",), "cpu", model_name=str(tiny_model), modes=("jit",))

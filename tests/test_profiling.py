"""`bem profile` measures trained modules, and the KV hit rate of SPEC §2 (shared prefix, aligned, real prompts)."""
import shutil
import sqlite3

import pytest
import torch

from conftest import routed_tiny
from test_experiments import tiny_setup, write  # noqa: F401  (module fixture: tiny llama + SmolLM2 tokenizer + data)


def _stream(chunk_size=None, shared=41, suffix=11, requests=4, side=None):
    from bem.profiling import KVStream

    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 128, (shared,), generator=gen).tolist()
    ids = [prefix + torch.randint(3, 128, (suffix,), generator=gen).tolist() for _ in range(requests)]
    for r in ids[1:]:  # make sure the requests really differ right after the shared prefix
        r[shared] = (ids[0][shared] + 1 + ids.index(r)) % 125 + 3
    return KVStream(ids, side, chunk_size)


def test_stream_denominator_is_the_shared_prefix_aligned_down_to_chunks():
    stream = _stream(chunk_size=4)
    assert stream.shared == 41 and stream.denominator == 40
    assert _stream().denominator == 41


def test_kv_hit_rate_base_prompt_scope_chunk_scope():
    from bem.models import tiny
    from bem.profiling import kv_hit_rate

    side = torch.zeros(4, 3)
    base, total = kv_hit_rate(tiny("llama"), _stream())
    assert base == 1.0 and total == 3 * 41  # the base model is 100% (measured), over 3 later requests
    chunk, total = kv_hit_rate(routed_tiny("llama", prefix_scope="chunk"), _stream(chunk_size=4, side=side))
    assert chunk >= 0.95 and total == 3 * 40
    prompt, _ = kv_hit_rate(routed_tiny("llama", prefix_scope="prompt"), _stream(side=side))
    assert prompt < 0.5
    # chunk codes read the side inputs: requests with different evidence cannot share the routed prefix
    different = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    assert kv_hit_rate(routed_tiny("llama", prefix_scope="chunk"), _stream(chunk_size=4, side=different))[0] < 0.5


def test_kv_stream_is_real_prompts_with_a_shared_few_shot_block(tiny_setup):  # noqa: F811
    from bem.models import load_base
    from bem.profiling import MIN_SHARED_BLOCK, kv_stream

    tokenizer = load_base(str(tiny_setup / "model"))[1]
    stream = kv_stream(tokenizer, "wordnet_define", root=tiny_setup / "data")
    assert len(stream.requests) == 4 and stream.shared >= MIN_SHARED_BLOCK
    texts = [tokenizer.decode(r) for r in stream.requests]
    assert all("Worked examples" in t and "Now answer this one." in t for t in texts)
    assert len(set(texts)) == 4  # each request ends in its own test item
    with pytest.raises(ValueError, match="few-shot block has .* tokens"):
        kv_stream(tokenizer, "wordnet_define", shots=1, root=tiny_setup / "data")


def test_profile_loads_trained_units_and_labels_untrained_ones(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """Two tiny units trained through `bem run`; `bem profile --out` measures their trained modules (and stores which
    unit), while the same experiments profiled without a run folder are fresh modules labelled untrained."""
    from bem.cli import profile_ratios
    from bem.experiments import runner
    from bem.experiments.config import load_experiment
    from bem.experiments.results import ResultsDB
    from bem.profiling import profile

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    experiments = tmp_path / "experiments"
    shutil.copytree(tiny_setup / "experiments", experiments)
    source = (experiments / "tiny_bem.yaml").read_text()
    write(experiments / "tiny_chunk.yaml", source.replace("  chunk_size: 4\n", "  chunk_size: 4\n  prefix_scope: chunk\n"))
    out = tmp_path / "run"
    runner.run(["tiny_bem", "tiny_chunk"], out, directory=experiments)
    configs = [load_experiment(n, experiments) for n in ("tiny_lora", "tiny_bem", "tiny_chunk")]
    options = {"prompt_len": 8, "decode_steps": 2, "warmup": 1, "repeats": 2}

    def stored(run_dir):
        results = profile(configs, run_dir=run_dir, **options)
        db = ResultsDB(run_dir / "results.sqlite")
        db.write_profiles(results)
        db.write_profile_ratios(profile_ratios(results, configs))
        db.close()
        conn = sqlite3.connect(run_dir / "results.sqlite")
        units = {e: (status, seed) for e, status, seed in conn.execute("SELECT experiment, status, seed FROM profile_units")}
        rates = dict(conn.execute("SELECT experiment, value FROM profiles WHERE metric='kv_hit_rate'").fetchall())
        return units, rates

    units, trained = stored(out)
    assert units == {"base": ("base", None), "tiny_lora": ("untrained", None), "tiny_bem": ("trained", 0),
                     "tiny_chunk": ("trained", 0)}
    assert trained["base"] == 1.0 and trained["tiny_lora"] == 1.0  # untrained: ΔW = 0
    assert trained["tiny_bem"] < 0.5  # prompt-scope codes depend on the whole prompt
    assert trained["tiny_chunk"] >= 0.95  # chunk scope: shared leading chunks get identical codes
    from bem.experiments.report import write_report

    report = write_report(out, n_resamples=200).read_text()  # the report says what each profile measured
    assert "| tiny_bem | cpu | trained, seed 0 | " in report and "| tiny_lora | cpu | untrained | 1.000 |" in report

    fresh = tmp_path / "fresh"  # no units finished here
    fresh.mkdir()
    units, untrained = stored(fresh)
    assert units["tiny_bem"] == units["tiny_chunk"] == ("untrained", None)
    assert untrained["tiny_bem"] == 1.0 != trained["tiny_bem"]  # the fresh-module profile measures the base model


def test_restored_adapter_equals_the_saved_one(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """A stored run folder without its adapters gets them back by retraining, checked against the stored curve."""
    from safetensors.torch import load_file

    from bem.experiments import runner
    from bem.experiments.adapters import AdapterMismatch, adapter_dir, load_trained, restore_adapter
    from bem.experiments.config import load_experiment

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    experiments = tiny_setup / "experiments"
    out = tmp_path / "run"
    runner.run(["tiny_bem"], out, directory=experiments)
    config = load_experiment("tiny_bem", experiments)
    saved = load_file(str(adapter_dir(out, config, 0) / "bem_weights.safetensors"))
    shutil.rmtree(out / "adapters")
    model, _ = load_trained(config, 0, out)
    restored = load_file(str(adapter_dir(out, config, 0) / "bem_weights.safetensors"))
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert model.bem_config == config.bem
    conn = sqlite3.connect(out / "results.sqlite")
    with conn:
        conn.execute("UPDATE curves SET loss = loss + 0.5 WHERE step = 3")
    with pytest.raises(AdapterMismatch, match="differs from the stored curve by .* by step 6"):
        restore_adapter(config, 0, out)
    with conn:  # a difference in the first steps stops the restore at the first checkpoint (step 2 of 6)
        conn.execute("UPDATE curves SET loss = loss - 0.5 WHERE step = 3")
        conn.execute("UPDATE curves SET loss = loss + 0.5 WHERE step = 1")
    with pytest.raises(AdapterMismatch, match="differs from the stored curve by .* by step 2 "):
        restore_adapter(config, 0, out)
    assert not list((out / "checkpoints").glob("restore-*"))  # nothing left to resume from
    with pytest.raises(FileNotFoundError, match="no finished unit"):
        restore_adapter(config, 1, out)


def test_profile_out_must_be_a_run_folder(tmp_path, capsys):
    from bem.cli import main

    assert main(["profile", "--experiments", "L0_lora", "--out", str(tmp_path / "typo")]) == 2
    assert "--out " + str(tmp_path / "typo") + ": no results.sqlite there" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()  # nothing created


def test_a_time_budget_cuts_the_rounds_but_not_below_three(capsys):
    """`bem profile --max-seconds`: the interleaved rounds stop when one more round and the memory and KV passes would
    not fit the budget, never below MIN_ROUNDS; without a budget every round asked for runs."""
    import time

    from bem.cli import main
    from bem.models import tiny
    from bem.profiling import MIN_ROUNDS, _subject, measure_interleaved

    def subjects():
        return [_subject(tiny("llama"), "base", "", 1, 8, 0, 128, _stream()),
                _subject(routed_tiny("llama"), "routed", "h", 1, 8, 3, 128, _stream(side=torch.zeros(4, 3)))]

    spent = measure_interleaved(subjects(), decode_steps=2, warmup=1, repeats=6, deadline=time.perf_counter())
    assert [p.rounds for p in spent] == [MIN_ROUNDS] * 2
    assert all(p.decode_p50_ms > 0 for p in spent)
    assert [p.rounds for p in measure_interleaved(subjects(), 2, 1, 6)] == [6, 6]
    assert [p.rounds for p in measure_interleaved(subjects(), 2, 1, 6, time.perf_counter() + 3600)] == [6, 6]
    assert [p.rounds for p in measure_interleaved(subjects(), 2, 1, 2, time.perf_counter())] == [2, 2]
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--max-seconds", "0", "--experiments", "L0_lora"])
    assert exit_.value.code == 2
    assert "0.0 is not allowed; expected a finite number > 0" in capsys.readouterr().err

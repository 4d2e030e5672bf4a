"""The heterogeneous-batch benchmark builds every subject and measures them against the base model in one run (a
smoke test of the benchmark on a tiny shape: PEFT's mixed batch with adapter_names, BEM's per-row expert masks and
per-row codes all run). Speed is measured by scripts/bench_hetero.py, never asserted here."""
import torch

from bem.hetero import SUBJECTS, bench_hetero, build, markdown


def test_every_subject_runs_and_has_a_ratio_to_the_base():
    result = bench_hetero("tiny", batch=8, seq=16, rounds=2)
    assert set(result["seconds"]) == set(SUBJECTS) and result["ratios"]["base"] == 1.0
    assert all(v > 0 for v in result["seconds"].values()) and "peft_mixed_over_bem_bank" in result["ratios"]
    assert "× base" in markdown(result)
    sequential = bench_hetero("tiny", batch=4, seq=8, rounds=1, subjects=("base", "bem_bank"), sequential=True)
    assert set(sequential["seconds"]) == {"base", "bem_bank"} and not sequential["interleaved"]


@torch.no_grad()
def test_mixed_rows_use_their_own_adapter():
    """Rows 0 and 4 share an adapter (expert), rows 0 and 1 do not: the same input gives equal logits exactly when
    the adapter is the same, for PEFT's mixed batch and for BEM's bank."""
    for subject in ("peft_mixed", "bem_bank"):
        model, kwargs = build(subject, "tiny", 8, torch.device("cpu"))
        ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0)).expand(8, -1)
        logits = model(ids, **kwargs).logits
        assert torch.allclose(logits[0], logits[4], atol=1e-6), subject
        assert not torch.allclose(logits[0], logits[1], atol=1e-4), subject

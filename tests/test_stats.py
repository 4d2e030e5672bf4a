"""Statistics checked against SciPy."""
import numpy as np
import pytest
from scipy import stats as sps

from bem.stats import benjamini_hochberg, cohens_dz, paired_bca, permutation_pvalue


DRAWS = {
    "normal": lambda rng, n: (rng.normal(size=n), rng.normal(0.3, 1, n)),
    "skewed": lambda rng, n: (rng.exponential(size=n), rng.exponential(size=n) - 0.8),
    "binary": lambda rng, n: (rng.integers(0, 2, n) * 1.0, rng.integers(0, 2, n) * 1.0),
    "heavy": lambda rng, n: (rng.standard_t(2, size=n), rng.standard_t(3, size=n)),
}


@pytest.mark.parametrize("n", [10, 30, 100, 300, 1000, 5000])
@pytest.mark.parametrize("kind", list(DRAWS))
def test_paired_bca_agrees_with_scipy(kind, n):
    """24 random datasets, n from 10 to 5,000: endpoints within Monte Carlo error of SciPy's BCa."""
    rng = np.random.default_rng(n)
    a, noise = DRAWS[kind](rng, n)
    b = a + noise
    ours = paired_bca(a, b, n_resamples=10_000, seed=1)
    ref = sps.bootstrap((a, b), lambda x, y, axis=-1: np.mean(y - x, axis=axis), paired=True, n_resamples=10_000,
                        method="BCa", random_state=2).confidence_interval
    width = ref.high - ref.low
    assert ours.estimate == pytest.approx(np.mean(b - a))
    assert abs(ours.low - ref.low) < 0.06 * width and abs(ours.high - ref.high) < 0.06 * width


def test_degenerate_inputs_give_a_point_and_say_why():
    r = paired_bca([1, 1, 1], [2, 2, 2])
    assert (r.low, r.estimate, r.high) == (1.0, 1.0, 1.0) and "equal" in r.note
    r = paired_bca([0.5], [1.0])
    assert r.low == r.high == 0.5 and "fewer than 2" in r.note


def test_corpus_statistic_is_recomputed_on_resamples():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=60), rng.normal(0.5, 1, 60)
    r = paired_bca(a, b, n_resamples=2000, statistic=lambda idx: np.median(b[idx]) - np.median(a[idx]))
    assert r.estimate == pytest.approx(np.median(b) - np.median(a)) and r.low < r.estimate < r.high


def test_family_of_comparisons_equals_each_comparison_alone():
    """paired_bca_family / permutation_pvalues share resamples across rows; each row is the single-comparison result."""
    from bem.stats import paired_bca, paired_bca_family, permutation_pvalue, permutation_pvalues

    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, (4, 300)).astype(float)
    b = np.clip(a + rng.normal([[0.0], [0.05], [0.2], [0.0]], 0.4, (4, 300)), 0, 1)
    b[3] = a[3] + 0.25  # degenerate row: every difference equal
    family = paired_bca_family(a, b, n_resamples=3_000, seed=7)
    pvalues = permutation_pvalues(a, b, n_resamples=3_000, seed=7)
    for k in range(4):
        alone = paired_bca(a[k], b[k], n_resamples=3_000, seed=7)
        assert family[k].note == alone.note
        assert (family[k].low, family[k].high) == pytest.approx((alone.low, alone.high), abs=1e-12)
        assert pvalues[k] == permutation_pvalue(a[k], b[k], n_resamples=3_000, seed=7)
    assert family[2].low > 0 and pvalues[2] < 0.01 and pvalues[0] > 0.01


def test_benjamini_hochberg_equals_scipy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.uniform(size=rng.integers(1, 40)) ** 2
        adjusted, rejected = benjamini_hochberg(p)
        np.testing.assert_allclose(adjusted, sps.false_discovery_control(p), rtol=1e-12)
        assert (rejected == (adjusted < 0.05)).all()


def test_permutation_pvalue_small_under_effect_and_large_under_null():
    rng = np.random.default_rng(4)
    a = rng.normal(size=100)
    assert permutation_pvalue(a, a + 0.5 + rng.normal(0, 0.3, 100), n_resamples=2000) < 0.01
    assert permutation_pvalue(a, a + rng.normal(0, 1, 100), n_resamples=2000) > 0.01
    assert permutation_pvalue(a, a) == 1.0
    assert cohens_dz([0, 0, 0, 0], [1, 2, 1, 2]) == pytest.approx(1.5 / np.std([1, 2, 1, 2], ddof=1))


def test_hierarchical_bootstrap_widens_with_seed_variance():
    from bem.stats import hierarchical_bootstrap

    rng = np.random.default_rng(5)
    items = rng.normal(size=150)
    a = items + rng.normal(0, 0.01, (3, 150))
    calm = items + 0.2 + rng.normal(0, 0.01, (3, 150))
    noisy = items + 0.2 + rng.normal(0, 0.01, (3, 150)) + rng.normal(0, 0.3, (3, 1))  # seed-level shifts
    r_calm = hierarchical_bootstrap(a, calm, n_resamples=2000)
    r_noisy = hierarchical_bootstrap(a, noisy, n_resamples=2000)
    assert r_calm.low < 0.2 < r_calm.high
    assert (r_noisy.high - r_noisy.low) > 3 * (r_calm.high - r_calm.low)


def test_hierarchical_bootstrap_matches_a_direct_resampling_loop_and_its_p_matches_its_interval():
    from bem.stats import hierarchical_bootstrap, hierarchical_pvalue

    rng = np.random.default_rng(11)
    items = rng.exponential(size=200)
    a = items + rng.normal(0, 0.3, (3, 200)) + rng.normal(0, 0.05, (3, 1))
    b = items + 0.05 + rng.normal(0, 0.3, (3, 200)) + rng.normal(0, 0.05, (3, 1))
    loop = np.empty(4000)  # the definition, one resample at a time, with its own random draws
    for k in range(len(loop)):
        it = rng.integers(0, 200, 200)
        loop[k] = b[rng.integers(0, 3, 3)][:, it].mean() - a[rng.integers(0, 3, 3)][:, it].mean()
    ours = hierarchical_bootstrap(a, b, n_resamples=4000)
    width = ours.high - ours.low
    assert ours.estimate == pytest.approx(b.mean() - a.mean())
    assert abs(ours.low - np.quantile(loop, 0.025)) < 0.1 * width
    assert abs(ours.high - np.quantile(loop, 0.975)) < 0.1 * width
    # one seed per system: the plain paired percentile bootstrap of the mean difference
    one = hierarchical_bootstrap(a[:1], b[:1], n_resamples=4000)
    ref = sps.bootstrap((b[0] - a[0],), np.mean, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert abs(one.low - ref.low) < 0.1 * (ref.high - ref.low) and abs(one.high - ref.high) < 0.1 * (ref.high - ref.low)
    for shift in (0.0, 0.05, 0.15, 0.4, -0.4):  # p < 0.05 exactly when the interval excludes 0
        r = hierarchical_bootstrap(a, b + shift, n_resamples=4000)
        p = hierarchical_pvalue(a, b + shift, n_resamples=4000)
        assert (p < 0.05) == (r.low > 0 or r.high < 0), (shift, p, r)
    with pytest.raises(ValueError, match="same items"):
        hierarchical_bootstrap(a, b[:, :10])
    with pytest.raises(ValueError, match="same seeds"):
        hierarchical_bootstrap(a, b[:2], paired_seeds=True)


def test_paired_seeds_cancel_a_seed_effect_both_systems_share():
    from bem.stats import hierarchical_bootstrap

    rng = np.random.default_rng(3)
    items = rng.normal(size=300)
    shared = rng.normal(0, 0.5, (3, 1))  # seed k moves both systems alike (same data order and init)
    a = items + shared + rng.normal(0, 0.05, (3, 300))
    b = items + shared + 0.1 + rng.normal(0, 0.05, (3, 300))
    paired = hierarchical_bootstrap(a, b, n_resamples=4000, paired_seeds=True)
    unpaired = hierarchical_bootstrap(a, b, n_resamples=4000)
    assert paired.low > 0.05 and paired.high < 0.15  # the shared seed effect cancels
    assert unpaired.low < 0 < unpaired.high  # treated as independent, it swamps the effect


@pytest.mark.parametrize("controller", ["static", "chunk"])
@pytest.mark.parametrize("kron", [False, True])
def test_analytic_flops_match_torch_flop_counter(controller, kron):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bem import BEMConfig, attach_bem, bem_layers
    from bem.budget import budget, site_flops
    from bem.module.layer import KronLayer, site_shape
    from bem.models import tiny

    tokens = 64
    extra = {"kron_sites": ["down_proj"], "kron_factor": [4, 8], "kron_terms": 3} if kron else {}
    config = BEMConfig(rank=4, sites=["o_proj", "down_proj"], controller=controller, chunk_size=16, **extra)
    ids = torch.randint(3, 128, (1, tokens))

    def count(model, **kwargs):
        with FlopCounterMode(display=False) as counter:  # (under no_grad its module tracker fails on hooks)
            model(ids, **kwargs)
        return counter.get_total_flops()

    base = count(tiny("llama"))
    model = attach_bem(tiny("llama"), config)
    added = (count(model) - base) / tokens

    def matmul(layer):  # the matrix products of a site (the flop counter counts no elementwise work)
        d_in, d_out = site_shape(layer.base_layer)
        if isinstance(layer, KronLayer):
            return 2 * layer.terms * (d_in * layer.b_shape[0] + d_out * layer.a_shape[1])
        return 2 * config.rank * (d_in + d_out)

    layers = bem_layers(model).values()
    assert any(isinstance(layer, KronLayer) for layer in layers) == kron
    matmuls = sum(matmul(layer) for layer in layers)
    elementwise = sum(site_flops(layer) - matmul(layer) for layer in layers)
    assert 0 < elementwise < 0.2 * matmuls
    if controller == "static":
        assert added == matmuls
        assert budget_flops(model, config, budget) == pytest.approx(matmuls + elementwise)
    else:
        c = model.bem_controller
        per_chunk = 2 * 32 * config.controller_hidden + 2 * config.controller_hidden * c.heads.width
        assert added == pytest.approx(matmuls + per_chunk / config.chunk_size, rel=0.10)


def budget_flops(model, config, budget):
    """budget() of a tiny model: it counts FLOPs from the model's config, built on the meta device."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.config.save_pretrained(folder)
        return budget(folder, config).flops_per_token


def _translations(n=60):
    rng = np.random.default_rng(5)
    words = "in the beginning god created heaven and earth light darkness water spirit day night".split()
    refs = [" ".join(rng.choice(words, rng.integers(5, 12))) for _ in range(n)]
    a = [" ".join(r.split()[: len(r.split()) // 2]) for r in refs]  # half of each reference
    b = [" ".join(r.split()[:-1]) for r in refs]  # all but the last word: clearly better
    return refs, a, b


@pytest.mark.parametrize("metric", ["corpus_chrf", "corpus_bleu"])
def test_corpus_statistics_reproduce_sacrebleu_corpus_scores(metric):
    from bem import metrics

    refs, a, _ = _translations()
    stats = metrics.corpus_statistics(metric, a, refs)
    direct = (metrics.corpus_chrf if metric == "corpus_chrf" else metrics.corpus_bleu)(a, refs)
    assert metrics.corpus_score_from_statistics(metric)(stats.sum(0)) == pytest.approx(direct, abs=1e-9)
    # any multiset of sentences: the row sum of their statistics
    pick = [3, 3, 7, 0, 59, 12]
    again = (metrics.corpus_chrf if metric == "corpus_chrf" else metrics.corpus_bleu)([a[i] for i in pick], [refs[i] for i in pick])
    assert metrics.corpus_score_from_statistics(metric)(stats[pick].sum(0)) == pytest.approx(again, abs=1e-9)


def test_corpus_bca_agrees_with_recomputing_sacrebleu_on_each_resample():
    """The fast path (summed statistics) and the generic statistic= path (sacrebleu on each resample)."""
    from bem import metrics
    from bem.stats import paired_bca, paired_bca_corpus, permutation_pvalue_corpus

    refs, a, b = _translations()
    sa, sb = (metrics.corpus_statistics("corpus_chrf", h, refs) for h in (a, b))
    fast = paired_bca_corpus(sa, sb, metrics.corpus_score_from_statistics("corpus_chrf"), n_resamples=2_000)

    def chrf_difference(idx):
        return (metrics.corpus_chrf([b[i] for i in idx], [refs[i] for i in idx])
                - metrics.corpus_chrf([a[i] for i in idx], [refs[i] for i in idx]))
    slow = paired_bca(np.zeros(60), np.zeros(60), n_resamples=2_000, statistic=chrf_difference)
    assert fast.estimate == pytest.approx(slow.estimate, abs=1e-9)
    assert fast.acceleration == pytest.approx(slow.acceleration, abs=1e-9)  # same jackknife
    width = slow.high - slow.low
    assert abs(fast.low - slow.low) < 0.15 * width and abs(fast.high - slow.high) < 0.15 * width
    assert fast.low > 0
    score = metrics.corpus_score_from_statistics("corpus_chrf")
    assert permutation_pvalue_corpus(sa, sb, score, n_resamples=2_000) < 0.01
    assert permutation_pvalue_corpus(sa, sa, score) == 1.0


def test_guard_gate_rejects_only_a_significantly_worse_secondary_metric():
    from bem.experiments.analysis import Comparison, guard_reasons

    def comp(metric, low, high, p_bh, slice_name="B"):
        return Comparison("v", "a", "bible_translate", slice_name, metric, 500, 3, 0.0, 0.0, (low + high) / 2, low, high,
                          p_bh, p_bh)

    worse = comp("corpus_bleu", -0.9, -0.2, 0.01)
    assert guard_reasons([worse]) == ["guard bible_translate corpus_bleu significantly worse: -0.5500, "
                                      "CI [-0.9000, -0.2000], BH p = 0.01"]
    assert guard_reasons([comp("corpus_bleu", -0.9, -0.2, 0.08)]) == []  # CI below 0 but not after BH
    assert guard_reasons([comp("corpus_bleu", -0.9, +0.1, 0.01)]) == []  # CI reaches 0
    assert guard_reasons([comp("chrf", -0.9, -0.2, 0.01)]) == []  # the primary metric has its own rule
    assert guard_reasons([comp("corpus_chrf", -0.9, -0.2, 0.01, "A")]) == []  # slices are not guards


def test_gates_are_checked_on_every_profiled_device():
    from bem.experiments.analysis import _gate_reasons

    gates = {"latency_ratio": 1.15, "memory_ratio": 1.05}
    ok = {"decode_p50_ms": 1.02, "peak_memory_mb": 1.00, "kv_hit_rate": 1.0}
    slow = {"decode_p50_ms": 1.30, "peak_memory_mb": 1.00, "kv_hit_rate": 1.0}
    raw = {"decode_p50_ms": 10.0, "peak_memory_mb": 500.0, "kv_hit_rate": 0.75}
    trained = {"cpu": "trained", "cuda": "trained"}
    units = {"v": {"ratios": {"a": {"cpu": ok, "cuda": slow}}, "profile": {"cpu": raw, "cuda": raw}, "profiled": trained},
             "a": {"ratios": {}, "profile": {"cpu": raw, "cuda": raw}, "profiled": dict(trained)}}
    assert _gate_reasons(units, "v", "a", gates) == ["latency gate fails on cuda: decode p50 ×1.300 (allowed ≤ ×1.15)"]
    units["a"]["profiled"]["cuda"] = "untrained"  # fresh modules measure the base model: never a pass
    assert _gate_reasons(units, "v", "a", gates)[0].startswith(
        "gates not measured on trained modules on cuda: a was profiled untrained")
    units["a"]["profiled"]["cuda"] = "trained"
    units["v"]["ratios"]["a"] = {"cpu": ok}  # one device: no device named in the reason
    units["v"]["profile"] = {"cpu": raw}
    assert _gate_reasons(units, "v", "a", gates) == []
    units["v"]["ratios"] = {}  # raw values only: their ratio, and a KV hit rate below the anchor's fails
    units["v"]["profile"] = {"cpu": {**raw, "decode_p50_ms": 12.0, "kv_hit_rate": 0.5}}
    assert _gate_reasons(units, "v", "a", gates) == ["latency gate fails: decode p50 ×1.200 (allowed ≤ ×1.15)",
                                                     "KV hit rate gate fails: 0.500 < 0.750"]
    assert _gate_reasons({"v": {}, "a": {}}, "v", "a", gates) == [
        "latency and memory gates not measured (run `bem profile --out` on this folder)"]


def _v13_like(rng, n=100):
    """Near-boundary data like v13_cpu's v4_film − L0_lora chrF: sign-flip p just under 0.05, CI touching 0."""
    a = rng.normal(40, 12, n)
    return a, a + rng.standard_t(3, n) * 1.6 - 0.33


@pytest.mark.parametrize("kind", ["normal", "skewed", "binary", "heavy", "v13_like", "sparse"])
def test_bootstrap_p_below_alpha_exactly_when_the_interval_excludes_0(kind):
    """On 60 datasets per kind, near and far from 0, one resample set: p < 1 − confidence ⟺ 0 ∉ CI, for
    single comparisons, families and corpus statistics."""
    from bem.stats import paired_bca_corpus, paired_bca_family

    rng = np.random.default_rng(sum(map(ord, kind)))
    checked = {True: 0, False: 0}
    for k in range(60):
        n = int(rng.integers(15, 250))
        if kind == "v13_like":
            a, b = _v13_like(rng, n)
        elif kind == "sparse":  # most paired differences exactly 0, as for two nearly identical systems
            a = rng.integers(0, 2, n).astype(float)
            b = a + rng.choice([-1.0, 0.0, 1.0], n, p=[0.06, 0.85, 0.09])
        else:
            a, noise = DRAWS[kind](rng, n)
            b = a + noise - np.mean(noise) + rng.normal(0, 2.5 / np.sqrt(n)) * np.std(noise)
        for confidence in (0.95, 0.9):
            r = paired_bca(a, b, n_resamples=1_000, confidence=confidence, seed=k)
            excludes = r.low > 0 or r.high < 0
            assert (r.p < 1 - confidence) == excludes, (kind, k, confidence, r)
            checked[excludes] += 1
        family = paired_bca_family(np.stack([a, b]), np.stack([b, a + 0.1 * (b - a)]), n_resamples=1_000, seed=k)
        for r in family:
            assert (r.p < 0.05) == (r.low > 0 or r.high < 0), (kind, k, r)
    assert min(checked.values()) >= 10  # both outcomes are exercised
    sa, sb = rng.poisson(5, (80, 2)).astype(float), rng.poisson(5, (80, 2)).astype(float)
    for shift in (0.0, 0.3, 1.0):
        r = paired_bca_corpus(sa, sb + [shift, 0], lambda s: s[0] / s[1], n_resamples=1_000)
        assert (r.p < 0.05) == (r.low > 0 or r.high < 0), (shift, r)


def test_bootstrap_p_is_the_level_at_which_an_interval_endpoint_reaches_0():
    """Inverting the BCa map: the interval at confidence 1 − p has an endpoint at 0 (to within one order statistic)."""
    rng = np.random.default_rng(8)
    for k in range(6):
        a, b = _v13_like(rng, 120)
        r = paired_bca(a, b, n_resamples=4_000, seed=k)
        if not 0.002 < r.p < 0.8:
            continue
        ordered = np.sort(np.asarray([r.low, r.high]))
        at = paired_bca(a, b, n_resamples=4_000, seed=k, confidence=1 - r.p)
        width = r.high - r.low
        assert min(abs(at.low), abs(at.high)) < 0.01 * width, (r, at, ordered)


def test_bootstrap_p_under_the_null_and_under_an_effect():
    rng = np.random.default_rng(21)
    null = np.array([paired_bca(np.zeros(150), rng.normal(size=150), n_resamples=1_000, seed=i).p for i in range(200)])
    assert 0.02 <= np.mean(null < 0.05) <= 0.09 and 0.4 <= np.mean(null < 0.5) <= 0.6  # about uniform
    a = rng.normal(size=200)
    strong = paired_bca(a, a + 0.4 + rng.normal(0, 1, 200), n_resamples=2_000)
    assert strong.p == pytest.approx(1 / 2_001) and strong.low > 0  # floored at the resolution of 2,000 resamples
    same = paired_bca(a, a)
    assert same.p == 1.0 and (same.low, same.high) == (0.0, 0.0)
    shifted = paired_bca([1, 1, 1], [2, 2, 2], n_resamples=500)
    assert shifted.p == 1 / 501 and shifted.low == 1.0  # a point interval at 1: p agrees with it


def test_v13_cpu_near_boundary_comparison_has_a_consistent_p():
    """The stored run where the sign-flip p (0.041) and the BCa CI ([−0.654, +0.0008]) disagreed: v4_film − L0_lora,
    bible_translate chrF; the bootstrap p of the same resamples agrees with the interval."""
    import sqlite3
    from pathlib import Path

    from bem.experiments.analysis import _item_means, _units
    from bem.stats import permutation_pvalue

    db = Path(__file__).resolve().parents[1] / "docs/results/v13_cpu/results.sqlite"
    conn = sqlite3.connect(db)
    units = _units(conn)
    ours = _item_means(conn, "v4_film", units["v4_film"]["hash"], "bible_translate", "chrf")
    theirs = _item_means(conn, "L0_lora", units["L0_lora"]["hash"], "bible_translate", "chrf")
    ids = sorted(set(ours) & set(theirs))
    a, b = np.array([theirs[i] for i in ids]), np.array([ours[i] for i in ids])
    r = paired_bca(a, b)
    assert r.low < 0 and abs(r.high) < 0.1  # the interval ends next to 0
    assert (r.p < 0.05) == (r.high < 0)
    assert permutation_pvalue(a, b) < 0.05  # the sign-flip test alone said "significant"


def test_corpus_metrics_score_the_same_first_line_as_the_per_item_scores():
    """One hypothesis per item: TaskSpec.corpus and the analysis' corpus comparisons use the first line."""
    import sacrebleu

    from bem.tasks import SPECS

    spec = SPECS["bible_translate"]
    refs, a, b = _translations(20)
    replies = [f"{h}\nNote: this is a translation of verse {i}." for i, h in enumerate(b)]
    items = [{"target": r} for r in refs]
    corpus = spec.corpus(replies, items)
    assert corpus["corpus_chrf"] == pytest.approx(sacrebleu.corpus_chrf(b, [refs]).score, abs=1e-9)
    assert corpus["corpus_bleu"] == pytest.approx(sacrebleu.corpus_bleu(b, [refs]).score, abs=1e-9)
    assert corpus["corpus_chrf"] != pytest.approx(sacrebleu.corpus_chrf(replies, [refs]).score, abs=0.1)
    per_item = [spec.score(p, it)["chrf"] for p, it in zip(replies, items)]
    assert per_item == [spec.score(spec.hypothesis(p), it)["chrf"] for p, it in zip(replies, items)]
    assert spec.hypothesis(replies[0]) == b[0] and SPECS["wordnet_define"].hypothesis(" x\ny") == "x"
    assert SPECS["wordnet_qa"].hypothesis("a\nb") == "a\nb"  # the QA scores extract their own span


def test_corpus_comparisons_from_stored_raw_replies_use_the_first_line(tmp_path):
    import sqlite3

    import sacrebleu

    from bem.experiments.analysis import _corpus_comparisons, corpus_scores
    from bem.experiments.config import ExperimentConfig
    from bem.experiments.results import ResultsDB

    refs, a, b = _translations(40)
    db = ResultsDB(tmp_path / "results.sqlite")
    run, units = db.start_run("test", False), {}
    for name, hyps in (("x", a), ("y", b)):
        config = ExperimentConfig(name, tasks=["bible_translate"])
        rows = [{"task": "bible_translate", "id": f"v{i}", "prediction": f"{h}\n(verse {i}, translated)",
                 "scores": {"chrf": 0.0}, "reference": refs[i]} for i, h in enumerate(hyps)]
        unit = db.write_unit(run, name, config.config_hash(), config.to_dict(), 0, rows, [], [], 1.0, 1.0)
        units[name] = {"hash": config.config_hash(), "config": config.to_dict(), "seeds": [0], "unit": unit}
    conn = sqlite3.connect(db.path)
    by_metric = {c.metric: c for c in _corpus_comparisons(conn, units, [("y", "x")], 1_000)}
    chrf = by_metric["corpus_chrf"]
    expected = sacrebleu.corpus_chrf(b, [refs]).score - sacrebleu.corpus_chrf(a, [refs]).score
    assert chrf.mean_experiment == pytest.approx(sacrebleu.corpus_chrf(b, [refs]).score, abs=1e-9)
    assert chrf.difference == pytest.approx(expected, abs=1e-9) and chrf.low > 0
    assert chrf.p < 0.05 and chrf.p_signflip < 0.05  # bootstrap p (agrees with the CI) and the secondary test
    assert corpus_scores(conn, units["x"]["unit"], "bible_translate")["corpus_bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(a, [refs]).score, abs=1e-9)


def test_a_comparison_uses_only_the_seeds_both_systems_ran(tmp_path):
    """A seed one side ran and the other did not stays out of the comparison (a bad extra seed of the baseline would
    otherwise make the experiment look better), and the verdict says which seeds were left out."""
    from bem.experiments.analysis import compare
    from bem.experiments.config import ExperimentConfig
    from bem.experiments.results import ResultsDB

    rng = np.random.default_rng(0)
    good = rng.uniform(0.2, 1.0, 150)
    db = ResultsDB(tmp_path / "results.sqlite")
    run = db.start_run("test", False)
    for name, anchor, seed, scores in (("L0_lora", None, 0, good), ("L0_lora", None, 1, np.zeros(150)),
                                       ("y", "L0_lora", 0, good + rng.normal(0, 0.01, 150))):
        config = ExperimentConfig(name, tasks=["wordnet_qa"], anchor=anchor)
        rows = [{"task": "wordnet_qa", "id": f"q{i}", "prediction": "x", "scores": {"f1": float(v), "em": 0.0},
                 "reference": "x"} for i, v in enumerate(scores)]
        db.write_unit(run, name, config.config_hash(), config.to_dict(), seed, rows, [], [], 1.0, 1.0)
    comparisons, verdicts, _ = compare(tmp_path / "results.sqlite", n_resamples=500)
    (c,) = [c for c in comparisons if c.experiment == "y" and c.slice == "B" and c.metric == "f1"]
    assert c.seeds == 1 and c.mean_versus == pytest.approx(good.mean()) and abs(c.difference) < 0.01
    assert c.low < 0 < c.high  # with L0_lora's seed 1 (all zeros) pooled in, y would be +0.3 better
    (v,) = [v for v in verdicts if v.experiment == "y"]
    assert v.verdict == "reject"
    assert any("compared on the seeds both ran (0); left out: L0_lora seeds 1" in r for r in v.reasons)
    assert any(r.startswith("single seed") for r in v.reasons)


def test_a_stored_baseline_system_does_not_limit_the_seeds_of_what_it_is_compared_with():
    """Majority and zero-shot are deterministic and stored once, as seed 0: a controller's seeds 0 and 1 are both
    compared with them (unpaired), while two trained systems use only the seeds both ran."""
    from bem.experiments.analysis import _seed_count, shared_seeds

    units = {"mm": {"seeds": [0, 1], "config": {"anchor": "text"}}, "text": {"seeds": [0], "config": {}},
             "mm/majority": {"seeds": [0], "config": {"system": "majority"}}}
    assert shared_seeds(units, "mm", "mm/majority") is None and _seed_count(units, "mm", "mm/majority") == 2
    assert shared_seeds(units, "mm", "text") == [0] and _seed_count(units, "mm", "text") == 1

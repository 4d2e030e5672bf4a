"""The router experiment end to end through `bem run` on a tiny model and a small root of real items: the bank,
fixed experts, oracles, AR0 → AR1 with its trust region, the baselines, the report; a rerun resumes, AR1 resumes."""
import json
import sqlite3

import pytest
import torch

from test_router_env import root  # noqa: F401  (the small data root fixture)

TASKS = ["wordnet_qa", "bible_translate", "wordnet_define", "json_format"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, root):  # noqa: F811
    from bem.data.prepare import record_task
    from bem.models import load_base, tiny

    folder = tmp_path_factory.mktemp("router_run")
    tokenizer = load_base("smollm2-135m")[1]
    model = tiny("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    path = root / "wordnet_qa" / "test.jsonl"  # index-swap fields, should a unit here ever score its conditions
    items = [json.loads(line) for line in path.read_text().splitlines()]
    for it in items:
        for condition in ("shuffled", "corrupt"):
            it[f"evidence_{condition}"], it[f"features_{condition}"] = it["evidence"][::-1], it["features"]
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    for task in TASKS:
        record_task(task, root, f"hand-made-{task}")
    exp = folder / "experiments"
    exp.mkdir()
    (exp / "tbank.yaml").write_text(
        f"model: {folder / 'model'}\ntasks: {json.dumps(TASKS)}\nseeds: [0]\nanchor: null\nside_inputs: false\n"
        "bem: {rank: 8, alpha: 16, sites: [o_proj, down_proj], controller: static, experts: 4, side_dim: 0}\n"
        "training: {steps: 3, batch_size: 4, lr: 0.01, warmup_steps: 1, checkpoint_every: 3, max_length: 96, "
        "train_items: 1}\nevaluation: {items: 1, batch_size: 2}\n")
    (exp / "tmt.yaml").write_text("base: tbank\nbem: {experts: 1}\n")
    (exp / "tctl.yaml").write_text("base: tbank\nside_inputs: true\nbem: {controller: chunk, chunk_size: 8, side_dim: 5}\n"
                                   f"training: {{init_bank: {exp / 'tbank.yaml'}}}\n")
    (exp / "trouter.yaml").write_text(
        f"model: {folder / 'model'}\ntasks: {json.dumps(TASKS)}\nseeds: [0]\nanchor: null\n"
        "bem: {rank: 8, alpha: 16, sites: [o_proj, down_proj], controller: chunk, chunk_size: 8, experts: 4, "
        "max_switches: 3, side_dim: 5}\nevaluation: {items: 1}\n"
        f"router: {{algorithm: pg, bank: {exp / 'tbank.yaml'}, multitask: {exp / 'tmt.yaml'}, controller: {exp / 'tctl.yaml'}, "
        "train_mixed: 4, "
        "train_composite: 1, test_mixed: 4, test_composite: 2, bc_epochs: 5, pg_updates: 2, pg_episodes: 4, "
        "rollout_batch: 4, hidden: 16, pg_lr: 0.05}\n")
    return folder


def _run(setup, root, monkeypatch, out):  # noqa: F811
    from bem.cli import main
    from bem.data import prepare as prepare_module

    monkeypatch.setenv("BEM_DATA", str(root))
    monkeypatch.setattr(prepare_module, "prepare", lambda tasks: None)  # the hand-made root stays as it is
    return main(["run", "--experiments", str(setup / "experiments" / "trouter.yaml"), "--out", str(out)])


def test_router_experiment_end_to_end(setup, root, monkeypatch, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert _run(setup, root, monkeypatch, out) == 0
    conn = sqlite3.connect(out / "results.sqlite")
    names = {n for (n,) in conn.execute("SELECT experiment FROM units")}
    expected = {"tbank", "tmt", "tctl", "trouter", "router/zero_shot"} | {f"router/expert:{t}" for t in TASKS} | {
        f"router/{b}" for b in ("best_single", "all_on", "random", "arrow", "multitask_lora", "controller",
                                "task_oracle", "item_oracle")}
    assert names == expected
    from safetensors.torch import load_file  # the controller trained over the bank left the bank's U, V untouched
    bank, ctl = (load_file(next((out / "adapters").glob(f"{n}-*")) / "bem_weights.safetensors") for n in ("tbank", "tctl"))
    sites = [k for k in bank if k.endswith((".U", ".V"))]
    assert sites and all(torch.equal(bank[k], ctl[k]) for k in sites)
    assert ctl["bem_controller.out.weight"].abs().sum() > 0  # starts at zero: the controller did train

    def scores(name, metric="score"):
        return dict(conn.execute("SELECT s.item_id, s.value FROM item_scores s JOIN units u ON u.id = s.unit_id "
                                 "WHERE u.experiment = ? AND s.metric = ?", (name, metric)))
    experts = [scores(f"router/expert:{t}") for t in TASKS]
    oracle, task_oracle = scores("router/item_oracle"), scores("router/task_oracle")
    assert len(oracle) == 6  # 4 mixed + 2 composite test episodes, every system on the same ones
    for name in names - {"tbank", "tmt", "tctl", "router/zero_shot"}:
        assert set(scores(name)) == set(oracle), name
    for episode, value in oracle.items():  # the per-item oracle is an upper bound of every fixed expert
        assert all(value >= e[episode] - 1e-12 for e in experts)
    for episode in oracle:  # the task-label oracle of a one-part episode is its task's expert
        if "+" not in episode:
            assert task_oracle[episode] == experts[TASKS.index(episode.split(":")[0])][episode]
    best = json.loads(conn.execute("SELECT c.json FROM configs c JOIN units u ON u.config_hash = c.hash WHERE "
                                   "u.experiment = 'router/best_single'").fetchone()[0])["best_expert"]
    assert scores("router/best_single") == experts[TASKS.index(best)]
    kl = [v for (v,) in conn.execute("SELECT value FROM router_curves WHERE metric = 'losses/approx_kl' ORDER BY step")]
    assert len(kl) == 2 and all(0 <= v <= 0.01 for v in kl)  # the trust region held at every AR1 update
    assert conn.execute("SELECT COUNT(*) FROM router_curves WHERE metric = 'bc/loss'").fetchone()[0] == 5
    assert {m for (m,) in conn.execute("SELECT metric FROM profiles WHERE experiment = 'router'")} == {
        "decode_ratio", "router_params", "bank_params"}
    costs = dict(conn.execute("SELECT experiment, value FROM profiles WHERE metric = 'decode_ratio' AND "
                              "experiment LIKE 'router_cost:%'"))
    assert set(costs) == {f"router_cost:{s}" for s in ("router", "all_on", "arrow", "multitask_lora", "controller")}
    assert all(v > 0 for v in costs.values())
    for baseline, own in (("router/multitask_lora", "tmt"), ("router/controller", "tctl")):
        seconds, done = conn.execute("SELECT eval_seconds, finished FROM units WHERE experiment = ?",
                                     (baseline,)).fetchone()
        own_done = conn.execute("SELECT finished FROM units WHERE experiment = ?", (own,)).fetchone()[0]
        assert 0 < seconds <= done - own_done + 1e-3, baseline  # its eval time excludes training its own unit
    report = (out / "report.md").read_text()
    assert "Wall clock of the job:" in report
    assert "| `trouter` | `router/best_single` |" in report and "## The expert bank" in report
    assert "decode × base" in report and "## The seed's claim" in report
    units = conn.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    conn.close()
    assert _run(setup, root, monkeypatch, out) == 0  # a rerun finds everything done
    assert sqlite3.connect(out / "results.sqlite").execute("SELECT COUNT(*) FROM units").fetchone()[0] == units
    assert "trouter              seed 0: skipped" in capsys.readouterr().out


def test_ar1_resumes_after_a_kill_where_it_stopped(setup, root, monkeypatch, tmp_path):  # noqa: F811
    """Two updates in one go equal one update, a kill, and a rerun of two: the same router weights and curve."""
    from dataclasses import replace

    from bem.experiments.config import load_experiment
    from bem.router import experiment

    monkeypatch.setenv("BEM_DATA", str(root))
    config = load_experiment(setup / "experiments" / "trouter.yaml")
    from bem import attach_bem, bem_state_dict
    from bem.models import load_base

    probe = attach_bem(load_base(str(setup / "model"))[0], replace(config.bem, controller="static", side_dim=0,
                                                                   max_switches=None, source=""))
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in bem_state_dict(probe).items()}
    train = experiment.episodes(config, "train")

    def train_pg(updates, folder):
        model, tokenizer, router = experiment.routed_model(config, weights, seed=0)
        cfg = replace(config, router=replace(config.router, pg_updates=updates))
        curve = experiment.train_pg(model, tokenizer, router, cfg, train, 0, folder)
        return router.state_dict(), curve

    straight, curve = train_pg(2, tmp_path / "straight")
    train_pg(1, tmp_path / "killed")  # as if killed after the first update
    resumed, resumed_curve = train_pg(2, tmp_path / "killed")
    assert curve == resumed_curve
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("body,message", [
    ("bem: {controller: prefix}\n", "bem.controller = 'prefix' is not allowed with a router: section; expected 'chunk'"),
    ("bem: {experts: 1}\n", "bem.experts = 1 is not allowed with a router: section; expected an integer > 1"),
    ("tasks: [wordnet_qa, bible_translate]\nbem: {experts: 2}\n", "tasks = ['wordnet_qa', 'bible_translate'] is not "
     "allowed with a router: section"),
    ("bem: {film: 2}\n", "bem.film = 2 is not allowed with a router: section; expected off"),
    ("router: {budgets: []}\n", "router.budgets = [] is not allowed with a router: section"),
    ("router: {budgets: [1.5]}\n", "router.budgets[0] = 1.5 is not allowed; expected a number > 0 and <= 1"),
    ("router: {algorithm: ppo}\n", "router.algorithm = 'ppo' is not allowed; expected one of 'bc', 'pg'"),
    ("router: {target_kl: 0}\n", "router.target_kl = 0 is not allowed; expected a number > 0 and <= 1"),
    ("router: {test_mixed: 0, test_composite: 0}\n", "router.test_mixed = 0 is not allowed with a router: section; "
     "expected > 0 when router.test_composite is 0"),
    ("router: {bank: nosuch}\n", "router.bank = 'nosuch' is not allowed; expected an experiment of"),
    ("router: {multitask: _defaults}\n", "router.multitask = '_defaults' is not allowed; expected an experiment of"),
])
def test_router_config_errors_name_file_field_value_and_allowed(tmp_path, body, message):
    from bem.experiments.config import ConfigError, _merge, load_experiment
    import yaml

    shipped = yaml.safe_load(open(__import__("pathlib").Path(__file__).parents[1] / "experiments" / "ar0_bc.yaml"))
    data = _merge(shipped, yaml.safe_load(body))
    shipped_dir = __import__("pathlib").Path(__file__).parents[1] / "experiments"
    for name in ("_defaults", "experts_bank", "router_multitask_lora", "router_controller"):
        (tmp_path / f"{name}.yaml").write_text((shipped_dir / f"{name}.yaml").read_text())
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_experiment("x", tmp_path)
    assert "x.yaml" in str(err.value) and message in str(err.value)


def test_shipped_router_experiments_load():
    from bem.experiments.config import load_experiment

    for name in ("ar0_bc", "ar1_pg"):
        for overlay in (None, "_quick", "_cpu"):
            config = load_experiment(name, overlay=overlay)
            assert config.router.algorithm == ("bc" if name == "ar0_bc" else "pg")
            assert config.bem.experts == 4 and config.bem.max_switches == 3

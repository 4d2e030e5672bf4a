"""Checkpoints that cannot lie (issue 13, item 3): a kill at any point of a save leaves a state the next run resumes
from; the newest checkpoint is verified completely (checksums, step, curve, tensor names/shapes/dtypes, finite
values, identity) before training resumes; load_bem leaves the model untouched when it refuses a folder."""
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bem import BEMConfig, attach_bem, bem_layers, load_bem, save_bem
from bem.module.attach import detach_bem
from bem.errors import CheckpointError
from bem.models import tiny
from conftest import SITES, routed_tiny

NAME = "tiny_ck"
IDENTITY = {"config_hash": "test", "data": "test"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama with SmolLM2's tokenizer as a local HF folder, a small prepared data folder, one experiment."""
    from transformers import AutoTokenizer

    from bem.data.prepare import prepare
    from bem.models import embedded_path

    root = tmp_path_factory.mktemp("ck")
    tokenizer = AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    tiny("llama", vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prepare(["wordnet_define", "json_format"], root / "data")
    (root / "experiments").mkdir()
    (root / "experiments" / f"{NAME}.yaml").write_text(
        f"model: {root / 'model'}\ntasks: [wordnet_define, json_format]\nseeds: [0]\nanchor: null\nside_inputs: false\n"
        "bem:\n  rank: 4\n  sites: [o_proj, down_proj]\n  controller: chunk\n  chunk_size: 4\n"
        "training:\n  steps: 6\n  batch_size: 2\n  grad_accum: 2\n  lr: 0.01\n  warmup_steps: 2\n"
        "  checkpoint_every: 2\n  max_length: 48\n  train_items: 20\nevaluation:\n  items: 4\n  batch_size: 4\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEM_DATA", str(root / "data"))
        mp.delenv("BEM_CRASH_AT", raising=False)
        yield root


@pytest.fixture(scope="module")
def straight(setup):
    """An uninterrupted run of the unit."""
    from bem.experiments import runner

    out = setup / "straight"
    assert runner.run([NAME], out, directory=setup / "experiments") == [(NAME, 0, "done")]
    return out


def _scores(db_path):
    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT u.experiment, u.seed, s.task, s.item_id, s.metric, s.value, s.prediction "
                        "FROM item_scores s JOIN units u ON u.id = s.unit_id ORDER BY 1, 2, 3, 4, 5").fetchall()
    curve = conn.execute("SELECT step, loss FROM curves ORDER BY step").fetchall()
    units = conn.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    conn.close()
    return rows, curve, units


FORK_SERVER = """
import os, sys
from pathlib import Path
from bem.experiments import runner  # imported once; no torch op runs here, so forking stays safe
name, out, experiments = sys.argv[1:4]
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:  # the child: os._exit(137) at the crash point, else 0 (finished) or 1 (an error)
        status = 1
        try:
            os.environ["BEM_CRASH_AT"] = line.strip()
            runner.run([name], Path(out), directory=Path(experiments))
            status = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(status)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Killer:
    """`runner.run` in other processes with BEM_CRASH_AT set; `kill(point)` returns the exit status. A fresh
    interpreter that has imported BEM but run no torch op forks a child per kill: each dies by `os._exit(137)` at the
    point like a new interpreter would, in a fraction of the time. (Forking pytest itself is not safe: its OpenMP
    threads, started by earlier tests, deadlock the child.)"""

    def __init__(self, setup: Path, out: Path):
        env = {**os.environ, "BEM_DATA": str(setup / "data"), "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, NAME, str(out), str(setup / "experiments")],
                                       env=env, cwd=Path(__file__).parents[1], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)

    def kill(self, point: str) -> int:
        self.server.stdin.write(point + "\n")
        self.server.stdin.flush()
        return int(self.server.stdout.readline())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


def _listing(folder: Path) -> set[str]:
    """Entry names with the random tails of temp folders cut off."""
    if not folder.is_dir():
        return set()
    return {p.name if not p.name.startswith(".") else p.name.rsplit("-", 1)[0] for p in folder.iterdir()}


def test_a_kill_at_every_point_of_a_save_resumes_to_the_same_scores(setup, straight):
    """One run folder killed at each crash point in turn, each start recovering what the previous kill left (the
    leftover temp folder's name shows which step the killed start was saving, so where it resumed from); then a
    last start finishes the unit, with the scores and curve of the uninterrupted run."""
    from bem.experiments import runner
    from bem.experiments.config import load_experiment
    from bem.experiments.training import latest_checkpoint

    out = setup / "killed"
    unit = runner.unit_name(load_experiment(NAME, setup / "experiments"), 0)
    checkpoints, adapters = out / "checkpoints" / unit, out / "adapters"
    new, old = f".{unit}.new", f".{unit}.old"
    chain = [  # (crash point, checkpoint folder afterwards, adapters folder afterwards)
        ("checkpoint.weights@2", {"step-00000002", ".tmp-step-00000004"}, set()),  # step 2 saved, 4 half written
        ("checkpoint.optimizer", {"step-00000002", ".tmp-step-00000004"}, set()),  # resumed at 2
        ("checkpoint.progress", {"step-00000002", ".tmp-step-00000004"}, set()),
        ("checkpoint.manifest", {"step-00000002", ".tmp-step-00000004"}, set()),  # complete but not yet renamed
        ("checkpoint.renamed", {"step-00000002", "step-00000004"}, set()),  # new in place, old not yet removed
        ("checkpoint.cleaned", {"step-00000006"}, set()),  # resumed at 4: its first save is step 6
        ("adapter.weights", {"step-00000006"}, {new}),  # trained, evaluated, adapter half written
        ("adapter.config", {"step-00000006"}, {new}),
        ("adapter.renamed", {"step-00000006"}, {unit, old}),  # the complete new one was put in place first
        ("adapter.moved_aside", {"step-00000006"}, {new, old}),  # the folder's name is free for a moment
        ("adapter.cleaned", {"step-00000006"}, {unit}),  # recovered, then saved once more
    ]
    killer = Killer(setup, out)
    try:
        statuses = []
        for point, want_checkpoints, want_adapters in chain:
            statuses.append(killer.kill(point))
            assert statuses[-1] == 137, f"{point}: exit status {statuses[-1]}"
            assert _listing(checkpoints) == want_checkpoints, point
            assert _listing(adapters) == want_adapters, point
            assert _scores(out / "results.sqlite")[2] == 0, point  # nothing stored by a killed run
            if point == "checkpoint.manifest":  # the hidden copy is complete, yet only a renamed folder counts
                assert [(p / "manifest.json").is_file() for p in checkpoints.glob(".tmp-*")] == [True]
    finally:
        killer.close()
    assert latest_checkpoint(checkpoints) == (checkpoints / "step-00000006", 6)

    assert runner.run([NAME], out, directory=setup / "experiments") == [(NAME, 0, "done")]
    rows_a, curve_a, _ = _scores(straight / "results.sqlite")
    rows_b, curve_b, units = _scores(out / "results.sqlite")
    assert units == 1 and len(rows_a) == 4 + 4 * 2 and rows_a == rows_b
    assert len(curve_a) == 6 and curve_a == curve_b
    assert not checkpoints.exists() and _listing(adapters) == {unit}
    assert sorted(os.listdir(adapters / unit)) == ["bem_config.json", "bem_weights.safetensors"]
    a = load_file(str(straight / "adapters" / unit / "bem_weights.safetensors"))
    b = load_file(str(adapters / unit / "bem_weights.safetensors"))
    # equal to float rounding, not bit for bit: with 2 threads the BLAS reductions of the output head's backward over
    # a few dozen target rows (training.target_loss) differ in the last bits from one process to another (measured:
    # 4e-5 of the largest weight after 6 steps, which AdamW's normalisation amplifies; with 1 thread they are equal);
    # the scores and curves above are equal bit for bit, and resuming from a wrong step differs by far more
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() / max(a[k].abs().max().item(), 1e-12) for k in a)
    assert diff <= 1e-3, diff


# --- damaged checkpoints: refused, naming the file ---------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    """(config, a unit folder holding the complete checkpoint of step 2)."""
    from bem.experiments.config import load_experiment
    from bem.experiments.training import train_unit

    config = load_experiment(NAME, setup / "experiments")
    folder = tmp_path_factory.mktemp("saved") / "unit"
    train_unit(config, 0, folder, stop_after=2, identity=IDENTITY)
    assert sorted(os.listdir(folder)) == ["step-00000002"]
    assert sorted(os.listdir(folder / "step-00000002")) == ["bem_weights.safetensors", "manifest.json", "optimizer.pt",
                                                           "progress.json"]
    return config, folder


def _rehash(step_dir: Path) -> None:
    """Make the manifest agree with the (edited) files, as a forger would."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (step_dir / name).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(step_dir: Path, change) -> None:
    tensors = load_file(str(step_dir / "bem_weights.safetensors"))
    change(tensors)
    save_file(tensors, step_dir / "bem_weights.safetensors")
    _rehash(step_dir)


def _flip_byte(path: Path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _first_site(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith(".U"))


def _nan(tensors):
    tensors[_first_site(tensors)][0, 0] = float("nan")


def _broadcastable(tensors):
    key = _first_site(tensors)
    tensors[key] = tensors[key][:1].clone()  # (1, r): copy_ would broadcast it over every row


DAMAGE = {  # name: (damage to the step-2 folder, error message pattern)
    "manifest step 999": (lambda d: _edit_json(d / "manifest.json", step=999), r"manifest.json: step = 999"),
    "progress step 999": (lambda d: (_edit_json(d / "progress.json", step=999), _rehash(d)),
                          r"progress.json: step = 999, expected 2"),
    "curve length": (lambda d: (_edit_json(d / "progress.json", curve=json.loads((d / "progress.json").read_text())
                                           ["curve"][:1]), _rehash(d)),
                     r"the curve has 1 rows at step 2; expected one per step"),
    "flipped byte": (lambda d: (shutil.copytree(d, d.with_name("step-00000001")),  # an older complete checkpoint
                                _flip_byte(d / "bem_weights.safetensors")),
                     r"step-00000002/bem_weights.safetensors: sha256 \w+ \(\d+ bytes\) differs from the manifest's.*"
                     r"deleting \S+step-00000002 resumes from the previous checkpoint step-00000001"),
    "flipped optimizer byte": (lambda d: _flip_byte(d / "optimizer.pt", 200),
                               r"optimizer.pt: sha256 .* deleting \S+step-00000002 starts the unit again from step 0"),
    "NaN weights": (lambda d: _edit_weights(d, _nan), r"bem_weights.safetensors: tensor \S+\.U has 1 NaN or infinite"),
    "broadcastable shape": (lambda d: _edit_weights(d, _broadcastable),
                            r"bem_weights.safetensors: tensor \S+\.U is torch.float32 \(1, 4\), the model's is "
                            r"torch.float32 \(\d+, 4\)"),
    "missing tensor": (lambda d: _edit_weights(d, lambda t: t.pop(_first_site(t))), r"missing \['model\.layers"),
    "garbled manifest": (lambda d: (d / "manifest.json").write_text('{"step": 2,'),
                         r"manifest.json: not readable JSON .* deleting \S+step-00000002 starts the unit again"),
}


def test_a_damaged_checkpoint_is_refused_naming_the_file(saved, tmp_path):
    """Each damage is caught before anything is loaded (one model serves every case: a refusal changes nothing)."""
    from bem.experiments.training import _lr_lambda, build_optimizer, load_checkpoint, train_unit
    from bem.models import load_base

    config, folder = saved
    model = attach_bem(load_base(config.model)[0], config.bem)
    optimizer = build_optimizer(model, config.training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.training.warmup_steps, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for case, (damage, message) in DAMAGE.items():
        unit = tmp_path / case.replace(" ", "_")
        shutil.copytree(folder, unit)
        damage(unit / "step-00000002")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(unit, model, optimizer, scheduler, 6, IDENTITY)
        assert (unit / "step-00000002").is_dir(), case  # refused, not deleted
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not optimizer.state
    with pytest.raises(CheckpointError, match="total_steps = 6, but this unit trains 8 steps"):
        load_checkpoint(folder, model, optimizer, scheduler, 8, IDENTITY)
    assert load_checkpoint(folder, model, optimizer, scheduler, 6, IDENTITY)[0] == 2  # the intact one loads

    unit = tmp_path / "other"  # through train_unit, as `bem run` meets it
    shutil.copytree(folder, unit)
    with pytest.raises(CheckpointError, match=r"written for \{'config_hash': 'test', 'data': 'test'\}, but this run is "
                       r"\{'config_hash': 'test', 'data': 'rebuilt'\}.*Delete the folder \S+other to train"):
        train_unit(config, 0, unit, stop_after=3, identity={**IDENTITY, "data": "rebuilt"})


def test_leftovers_are_cleaned_and_the_old_layout_still_resumes(saved, tmp_path):
    """Temp folders and step folders without a manifest (incomplete) are removed and the newest complete checkpoint
    is used; a folder of the layout before manifests (files directly in the unit's folder) resumes with a warning."""
    from bem.experiments.training import train_unit

    config, folder = saved
    unit = tmp_path / "unit"
    shutil.copytree(folder, unit)
    shutil.copytree(unit / "step-00000002", unit / "step-00000004")
    (unit / "step-00000004" / "manifest.json").unlink()  # incomplete: never renamed like this by a save
    (unit / ".tmp-step-00000006-abc").mkdir()
    (tmp_path / ".unit-xyz").mkdir()  # the temp folder of the layout before manifests
    trained = train_unit(config, 0, unit, stop_after=3, identity=IDENTITY)
    assert trained.resumed_from == 2 and len(trained.curve) == 3
    assert sorted(os.listdir(unit)) == ["step-00000003"] and not (tmp_path / ".unit-xyz").exists()

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("bem_weights.safetensors", "optimizer.pt", "progress.json"):
        shutil.copy(folder / "step-00000002" / name, legacy / name)
    resumed = train_unit(config, 0, legacy, stop_after=3, identity=IDENTITY)
    assert resumed.resumed_from == 2 and [r["loss"] for r in resumed.curve] == [r["loss"] for r in trained.curve]
    assert sorted(os.listdir(legacy)) == ["step-00000003"]  # migrated: the old files are gone


# --- load_bem: refused folders leave the model as it was ------------------------------------------------------------
def _ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(folder written by save_bem, the saved model's logits)."""
    model = routed_tiny("llama")
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.normal_(0, 0.3)
        want = model(_ids(), bem_prompt_len=4, bem_side=torch.ones(2, 3)).logits
    folder = save_bem(model, tmp_path_factory.mktemp("adapter") / "good")
    return folder, want


def _rehash_adapter(folder: Path) -> None:
    meta = json.loads((folder / "bem_config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / "bem_weights.safetensors").read_bytes()).hexdigest()
    (folder / "bem_config.json").write_text(json.dumps(meta))


def _edit_adapter(folder: Path, change) -> None:
    tensors = load_file(str(folder / "bem_weights.safetensors"))
    change(tensors)
    save_file(tensors, folder / "bem_weights.safetensors")
    _rehash_adapter(folder)


ADAPTER_DAMAGE = {
    "flipped bit": (lambda f: _flip_byte(f / "bem_weights.safetensors"), r"bem_weights.safetensors: sha256 \w+ differs"),
    "NaN": (lambda f: _edit_adapter(f, _nan), r"bem_weights.safetensors: tensor \S+\.U has 1 NaN or infinite"),
    "wrong shape": (lambda f: _edit_adapter(f, _broadcastable), r"\.U is torch.float32 \(1, 4\), the model's is"),
    "missing tensor": (lambda f: _edit_adapter(f, lambda t: t.pop(_first_site(t))), r"missing \['model\.layers"),
}


def _assert_untouched(model, base_logits, keys, grads):
    assert not bem_layers(model) and getattr(model, "_bem_runtime", None) is None
    assert "bem_controller" not in model._modules and "forward" not in vars(model) and "generate" not in vars(model)
    assert list(model.state_dict()) == keys and {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, base_logits)


def test_load_bem_refuses_a_damaged_folder_and_leaves_the_model_as_it_was(adapter, tmp_path):
    good, want = adapter
    model = tiny("llama")
    keys, grads = list(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        base_logits = model(_ids()).logits
    for case, (damage, message) in ADAPTER_DAMAGE.items():
        bad = tmp_path / case.replace(" ", "_")
        shutil.copytree(good, bad)
        damage(bad)
        with pytest.raises(CheckpointError, match=message):
            load_bem(model, bad)
        _assert_untouched(model, base_logits, keys, grads)
    load_bem(model, good)  # the retry with the good folder works on the same model
    with torch.no_grad():
        assert torch.equal(model(_ids(), bem_prompt_len=4, bem_side=torch.ones(2, 3)).logits, want)
    with pytest.raises(ValueError, match="already attached"):  # refused up front: the attached BEM stays
        load_bem(model, good)
    with torch.no_grad():
        assert torch.equal(model(_ids(), bem_prompt_len=4, bem_side=torch.ones(2, 3)).logits, want)


def test_previous_format_loads_without_checksum_and_with_every_other_check(adapter, tmp_path, caplog):
    good, want = adapter
    old = tmp_path / "v1"
    shutil.copytree(good, old)
    meta = json.loads((old / "bem_config.json").read_text())
    assert meta["format_version"] == 2 and len(meta.pop("weights_sha256")) == 64
    (old / "bem_config.json").write_text(json.dumps({**meta, "format_version": 1}))
    with caplog.at_level("WARNING", logger="bem.module.attach"):
        model = load_bem(tiny("llama"), old)
    assert "has no checksum" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(_ids(), bem_prompt_len=4, bem_side=torch.ones(2, 3)).logits, want)
    tensors = load_file(str(old / "bem_weights.safetensors"))
    _nan(tensors)
    save_file(tensors, old / "bem_weights.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_bem(tiny("llama"), old)


def test_save_bem_replaces_an_adapter_folder_only(adapter, tmp_path):
    good, _ = adapter
    model = load_bem(tiny("llama"), good)
    target = tmp_path / "run" / "adapter"
    save_bem(model, target)
    save_bem(model, target)  # replaced whole
    assert sorted(os.listdir(target.parent)) == ["adapter"]
    assert sorted(os.listdir(target)) == ["bem_config.json", "bem_weights.safetensors"]
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds \['notes.txt'\] besides a saved adapter"):
        save_bem(model, target)
    assert (target / "notes.txt").read_text() == "mine"


def test_detach_bem_restores_the_base_model():
    base = tiny("llama")
    with torch.no_grad():
        want = base(_ids()).logits
    model = attach_bem(tiny("llama"), BEMConfig(rank=4, sites=SITES["llama"], controller="chunk", side_dim=3))
    detach_bem(model)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, want)
    assert list(model.state_dict()) == list(base.state_dict())
    attach_bem(model, BEMConfig(rank=4, sites=SITES["llama"], controller="static"))  # attachable again

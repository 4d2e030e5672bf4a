"""`bem bench`: what BEM costs against the base model and PEFT's LoRA, measured in one process.

Subjects (all on the same base model, rank 8 on o_proj + down_proj like the shipped experiments): the base model,
PEFT LoRA unmerged and merged, BEM static (L0_lora's modules), BEM routed (S1_anchor's) and each v13 variant.
Work: prefill of a B × T prompt, one decode step on its KV cache, greedy generation (tokens/s) and one training
step (forward, backward, AdamW) on B × T tokens, in fp32 and in bf16 autocast. Rounds are interleaved: every round
runs each subject once, in an order rotated from round to round, so that drift of the machine falls on all alike;
medians over rounds. Ratios are against the base model measured in the same run and mode (train steps: against PEFT
LoRA, the base has nothing to train). This is a benchmark, not a test: it asserts nothing, it reports.

Modes (`--modes`): `eager` (on CUDA BEM's sites run the fused Triton kernel, bem.module.fused), `eager_unfused` (the
torch reference path of the sites; the same as `eager` off CUDA) and `compiled` (every subject's forward, the base
model's too, under `torch.compile`, inductor by default; compiling happens in the warm-up round).

Modules are fresh with random non-zero weights: cost does not depend on the values, and every subject computes its
full path (no ΔW = 0 shortcuts exist in BEM or PEFT).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bem.errors import BEMError
from bem.precision import autocast, bf16_supported

GOALS = {"decode_ms": 1.10, "prefill_ms": 1.05}  # BEM routed over base, at equal precision
TRAIN_GOAL = 1.0  # BEM routed train step over PEFT LoRA's at equal rank
SUBJECTS = ("base", "peft_lora", "peft_lora_merged", "bem_static", "bem_routed",
            "v1_dynrank", "v2_gateshaping", "v3_kron", "v4_film")
EXPERIMENT_OF = {"bem_static": "L0_lora", "bem_routed": "S1_anchor", "v1_dynrank": "v1_dynrank",
                 "v2_gateshaping": "v2_gateshaping", "v3_kron": "v3_kron", "v4_film": "v4_film"}


@dataclass
class Row:
    subject: str
    precision: str
    prefill_ms: float
    decode_ms: float
    generate_tokens_per_s: float
    train_step_s: float | None  # None: nothing to train (the base model, merged LoRA)
    ratios: dict = field(default_factory=dict)
    mode: str = "eager"  # eager, eager_unfused or compiled; ratios are against the base in the same mode


MODES = ("eager", "eager_unfused", "compiled")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seeded_(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build(name: str, model_name: str, device: torch.device):
    """(model, extra forward kwargs maker, trainable parameters) of one subject."""
    from bem.models import load_base

    model, _ = load_base(model_name)
    if name == "base":
        return model.to(device), [], None
    if name.startswith("peft_lora"):
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["o_proj", "down_proj"]))
        _seeded_([p for p in peft.parameters() if p.requires_grad], 1)
        if name == "peft_lora_merged":
            return peft.merge_and_unload().to(device), [], None
        return peft.to(device), [p for p in peft.parameters() if p.requires_grad], None
    from bem import attach_bem
    from bem.experiments.config import load_experiment

    config = load_experiment(EXPERIMENT_OF[name])
    attach_bem(model, config.bem)
    params = [p for p in model.parameters() if p.requires_grad]
    _seeded_(params, 1)
    routed = config.bem.controller != "static"
    return model.to(device), params, (config.bem.side_dim if routed else None)


def _kwargs(side_dim: int | None, batch: int, prompt_len: int, device: torch.device) -> dict:
    if side_dim is None:
        return {}
    out = {"bem_prompt_len": torch.full((batch,), prompt_len, device=device)}
    if side_dim:
        out["bem_side"] = torch.randn(batch, side_dim, generator=torch.Generator().manual_seed(2)).to(device)
    return out


def _prefill_and_decode(model, ids, kwargs, decode_steps: int, device) -> tuple[float, float]:
    """Seconds of one prefill and the median decode step after it (profiling's timed pass)."""
    from bem.profiling import _one_pass, _Subject

    prefill, steps = _one_pass(_Subject("bench", "", model, ids, kwargs, None, [], []), decode_steps)
    return prefill, float(np.median(steps))


@torch.no_grad()
def _generate(model, ids, kwargs, new_tokens: int, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    _sync(device)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t0)


def _train_step(model, params, optimizer, ids, kwargs, device) -> float:
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    loss = model(ids, labels=ids, **kwargs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    model.eval()
    return time.perf_counter() - t0


def bench(subjects: list[str] = list(SUBJECTS), precisions: tuple[str, ...] | None = None, device: str = "cpu",
          model_name: str = "smollm2-135m", batch: int = 8, prompt_len: int = 128, decode_steps: int = 8,
          new_tokens: int = 32, train_len: int = 160, rounds: int = 3, warmup: int = 1, log=print,
          modes: tuple[str, ...] = ("eager",), compile_backend: str = "inductor") -> dict:
    """Every subject × precision × mode, `rounds` interleaved rounds after `warmup`; medians and ratios (see module
    doc). `compile_backend` is torch.compile's backend in the compiled mode."""
    from bem.module import fused

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise BEMError(f"--modes: {unknown} not allowed; expected some of {list(MODES)}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BEMError(f"--device {device!r} is not allowed; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BEMError(f"--device {device!r}: no CUDA device is available here; expected cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BEMError(f"--device {device!r} is not allowed; expected cpu, cuda or cuda:N")
    if precisions is None:  # both where bf16 is native, else fp32 alone (said once)
        precisions = ("fp32", "bf16") if bf16_supported(dev) else ("fp32",)
        if len(precisions) == 1:
            log(f"{_describe(dev)}: no native bf16 (no AVX512-BF16/AMX); measuring fp32 only "
                "(ask for it with --precisions fp32 bf16)")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (batch, prompt_len), generator=gen).to(dev)
    train_ids = torch.randint(10, 30000, (batch, train_len), generator=gen).to(dev)
    held = {}
    for name in subjects:
        model, params, side_dim = build(name, model_name, dev)
        model.eval()
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        forwards = {"eager": model.forward, "eager_unfused": model.forward}
        if "compiled" in modes:
            forwards["compiled"] = torch.compile(model.forward, backend=compile_backend)
        held[name] = (model, params, optimizer, _kwargs(side_dim, batch, prompt_len, dev),
                      _kwargs(side_dim, batch, train_len, dev), forwards)
    samples: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for r in range(warmup + rounds):
        shift = r % len(subjects)
        for name in subjects[shift:] + subjects[:shift]:
            model, params, optimizer, kwargs, train_kwargs, forwards = held[name]
            for precision, mode in ((p, m) for p in precisions for m in modes):
                start = time.perf_counter()
                model.forward = forwards[mode]  # generate() and the passes call model(...), i.e. this forward
                with autocast(dev, precision), fused.enabled(mode != "eager_unfused"):
                    prefill, decode = _prefill_and_decode(model, ids, kwargs, decode_steps, dev)
                    tokens_per_s = _generate(model, ids, kwargs, new_tokens, dev)
                    train = _train_step(model, params, optimizer, train_ids, train_kwargs, dev) if params else None
                log(f"round {r + 1}/{warmup + rounds}: {name} {precision} {mode} in {time.perf_counter() - start:.0f} s")
                if r < warmup:
                    continue
                s = samples.setdefault((name, precision, mode), {"prefill": [], "decode": [], "gen": [], "train": []})
                s["prefill"].append(prefill)
                s["decode"].append(decode)
                s["gen"].append(tokens_per_s)
                if train is not None:
                    s["train"].append(train)
        log(f"round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''} done")
    rows = []
    for (name, precision, mode), s in samples.items():
        rows.append(Row(name, precision, float(np.median(s["prefill"]) * 1e3), float(np.median(s["decode"]) * 1e3),
                        float(np.median(s["gen"])), float(np.median(s["train"])) if s["train"] else None, mode=mode))
    by = {(row.subject, row.precision, row.mode): row for row in rows}
    for row in rows:
        base, lora = by.get(("base", row.precision, row.mode)), by.get(("peft_lora", row.precision, row.mode))
        if base is not None:
            row.ratios.update(prefill=row.prefill_ms / base.prefill_ms, decode=row.decode_ms / base.decode_ms,
                              generate_time=base.generate_tokens_per_s / row.generate_tokens_per_s)
        if lora is not None and row.train_step_s is not None and lora.train_step_s:
            row.ratios["train_vs_peft_lora"] = row.train_step_s / lora.train_step_s
    return {"device": _describe(dev), "torch": torch.__version__, "model": model_name,
            "bf16_native": bf16_supported(dev), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "settings": {"batch": batch, "prompt_len": prompt_len, "decode_steps": decode_steps,
                         "new_tokens": new_tokens, "train_len": train_len, "rounds": rounds, "warmup": warmup,
                         "threads": torch.get_num_threads(), "modes": list(modes), "compile_backend": compile_backend},
            "rows": [asdict(row) for row in sorted(rows, key=lambda r: (modes.index(r.mode), r.precision,
                                                                        subjects.index(r.subject)))]}


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def goal_lines(result: dict) -> list[str]:
    """The issue's goals at equal precision, each with its measured ratio: met or missed (and by how much)."""
    lines = []
    for row in result["rows"]:
        if row["subject"] != "bem_routed":
            continue
        for metric, goal in GOALS.items():
            ratio = row["ratios"].get(metric.removesuffix("_ms"))
            if ratio is not None:
                verdict = "met" if ratio <= goal else f"missed by {ratio - goal:+.2f}"
                lines.append(f"{_section(row)}: BEM routed {metric.removesuffix('_ms')} ×{ratio:.3f} base "
                             f"(goal ≤ ×{goal:.2f}): {verdict}")
        ratio = row["ratios"].get("train_vs_peft_lora")
        if ratio is not None:
            verdict = "met" if ratio <= TRAIN_GOAL else f"missed by {ratio - TRAIN_GOAL:+.2f}"
            lines.append(f"{_section(row)}: BEM routed train step ×{ratio:.3f} PEFT LoRA (goal ≤ ×{TRAIN_GOAL:.2f}): "
                         f"{verdict}")
    return lines


def _section(row: dict) -> str:
    """A row's precision, and its mode unless eager (results stored before modes existed are eager)."""
    mode = row.get("mode", "eager")
    return row["precision"] if mode == "eager" else f"{row['precision']} {mode}"


def markdown(result: dict) -> str:
    """The result as Markdown tables, one per precision and mode."""
    s = result["settings"]
    out = [f"Device: {result['device']} ({result.get('cpu_capability', '?')}; native bf16: "
           f"{'yes' if result.get('bf16_native') else 'no'}); torch {result['torch']}; model {result['model']}; prefill and decode at "
           f"B = {s['batch']}, T = {s['prompt_len']}; generation {s['new_tokens']} new tokens per row; train step "
           f"B = {s['batch']} × {s['train_len']} tokens; medians of {s['rounds']} interleaved rounds after "
           f"{s['warmup']} warm-up.", ""]
    for section in dict.fromkeys(_section(r) for r in result["rows"]):
        out += [f"**{section}**", "",
                "| subject | prefill ms | ×base | decode step ms | ×base | generate tok/s | time ×base | train step s | ×PEFT LoRA |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if _section(r) == section):
            q = r["ratios"]
            fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
            out.append(f"| {r['subject']} | {r['prefill_ms']:.1f} | {fmt(q.get('prefill'), '.3f')} | "
                       f"{r['decode_ms']:.1f} | {fmt(q.get('decode'), '.3f')} | {r['generate_tokens_per_s']:.1f} | "
                       f"{fmt(q.get('generate_time'), '.3f')} | {fmt(r['train_step_s'], '.2f')} | "
                       f"{fmt(q.get('train_vs_peft_lora'), '.3f')} |")
        out.append("")
    out += ["Goals (issue 14, equal precision and mode):" if len(result["settings"].get("modes", ["eager"])) > 1
            else "Goals (issue 14, equal precision):", ""] + [f"- {line}" for line in goal_lines(result)]
    return "\n".join(out) + "\n"


def write(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(markdown(result))

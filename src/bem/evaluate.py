"""Batched greedy generation and per-item scoring of the task suite (`bem eval`)."""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bem.data.batches import prompt_ids
from bem.tasks import SPECS, dumps, item_meta, load_items, side_vectors

log = logging.getLogger(__name__)
LENGTH_STEP = 64  # static decoding: cache lengths are multiples of this


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int | list[int], batch_size: int = 16,
             side: torch.Tensor | None = None, desc: str = "generate",
             bem_mask: torch.Tensor | None = None, pick=None, decoding: str = "dynamic") -> list[str]:
    """Greedy replies to chat prompts, batched by length with left padding and the KV cache (sampled ones when
    `pick` is given, e.g. `nucleus(...)`: it maps the batch's last logits (b, V) to one token per row).

    `max_new_tokens` is one limit for all, or one per prompt (prompts of several tasks in one call: a row leaves the
    batch at its own limit, so its reply is what a call with its limit alone gives).

    Prompts are sorted by length and cut into batches of `batch_size`; within a batch a row that has emitted the end
    token leaves the batch (see `greedy`), so finished rows cost nothing. With BEM attached, each row's real prompt
    length and side inputs go to the controller, and its row of `bem_mask` (n, r) to the sites (an expert bank's
    block). Replies do not depend on `batch_size` (tested).

    `decoding` (`bem.decoding`): `dynamic` (`greedy`: a growing cache, finished rows leave), `static` (a static cache;
    every batch padded to `batch_size` rows and one cache length, so a compiled step is made once per task),
    `compiled` (static, the decode step under torch.compile: CUDA graphs on a GPU) or `auto` (compiled on a GPU,
    dynamic on the CPU; routers always dynamic). The replies are the same in every mode (tested).
    """
    from bem.decoding import decoder_for, resolve_decoding

    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"generate: {len(limits)} max_new_tokens for {len(prompts)} prompts; expected one per prompt")
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    replies = [""] * len(prompts)
    bem = getattr(model, "_bem_runtime", None) is not None
    if bem_mask is not None and not bem:
        raise ValueError("bem_mask was given but the model has no BEM attached; a mask selects BEM basis directions")
    device = next(model.parameters()).device  # after training on a GPU the model is still there
    mode = resolve_decoding(model, decoding)
    decode = functools.partial(greedy, model) if mode == "dynamic" else decoder_for(model, mode)
    # one shape for every batch (rows, cache length rounded up to a multiple of LENGTH_STEP): one compiled step per call,
    # and calls whose prompts differ a little (a task's index-swap conditions) share it
    need = max(map(len, encoded), default=0) + max(limits, default=0)
    fixed = {} if mode == "dynamic" else {"rows": min(batch_size, len(prompts)),
                                          "length": -(-need // LENGTH_STEP) * LENGTH_STEP}
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        kwargs = {}
        if bem:
            kwargs["bem_prompt_len"] = mask.sum(1).to(device)
            if side is not None:
                kwargs["bem_side"] = side[idx].to(device)
            if bem_mask is not None:
                kwargs["bem_mask"] = bem_mask[idx].to(device)
        batch_limits = [limits[i] for i in idx]
        out = decode(ids.to(device), mask.to(device),
                     batch_limits[0] if len(set(batch_limits)) == 1 else batch_limits, eos, pick=pick, **fixed, **kwargs)
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row], skip_special_tokens=True)
    return replies


def forward_parameters(model) -> Mapping[str, inspect.Parameter]:
    """The parameters of the forward that finally runs. A PEFT wrapper's forward takes `**kwargs` and hands them on,
    so it is looked through to its base model's: the cache (`cache` since transformers 5.24, `past_key_values`
    before), `position_ids` and `logits_to_keep` then reach a PEFT model (Arrow, LoRA) under their own names."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return inspect.signature(model.forward).parameters


def cache_name(model) -> str:
    """The keyword the model's forward takes its KV cache under (transformers 5.24 renamed it)."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


@torch.no_grad()
def greedy(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | list[int], eos: list[int],
           pick=None, **kwargs) -> list[list[int]]:
    """Greedy continuation of a left-padded batch: each row's new tokens, up to and including its first end token,
    at most `max_new_tokens` (one limit, or one per row).

    The same tokens as `model.generate(do_sample=False)` (tested), but a row that has ended is dropped from the
    batch, its KV cache and BEM's routing state (`BEMRuntime.select_rows`), so the remaining rows' steps get cheaper
    instead of computing pads until the longest reply ends. Only the last position's logits are computed.
    `kwargs` (bem_prompt_len, bem_side, bem_mask: one row per sequence) go to every call, as generate passes them.
    `pick` (logits (b, V) → tokens (b,)) replaces the argmax, e.g. `nucleus(...)` to sample with the same row dropping.
    """
    from transformers import DynamicCache

    cache, runtime = DynamicCache(), getattr(model, "_bem_runtime", None)
    accepted = forward_parameters(model)
    takes_positions = "position_ids" in accepted
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    cache_kw = cache_name(model)
    rows = torch.arange(len(ids), device=ids.device)  # batch row → input row
    new: list[list[int]] = [[] for _ in range(len(ids))]
    stop = torch.tensor(eos, device=ids.device)
    limits = None if isinstance(max_new_tokens, int) else torch.tensor(max_new_tokens, device=ids.device)
    steps = max_new_tokens if limits is None else int(limits.max())
    step_ids = ids
    for step in range(steps):
        extra = {"position_ids": (mask.cumsum(1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]} if takes_positions else {}
        logits = model(input_ids=step_ids, attention_mask=mask, use_cache=True, **{cache_kw: cache}, **last_only,
                       **extra, **kwargs).logits[:, -1]
        token = logits.argmax(-1) if pick is None else pick(logits)
        for row, t in zip(rows.tolist(), token.tolist()):
            new[row].append(t)
        going = ~torch.isin(token, stop)
        if limits is not None:  # a row at its own limit leaves as an ended one does
            going &= limits[rows] > step + 1
        if step == steps - 1 or not going.any():
            break
        if not going.all():  # rows that ended leave the batch, its cache and its routing state
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            if runtime is not None:
                runtime.select_rows(cache, keep)
            rows, token, mask = rows[keep], token[keep], mask[keep]
            kwargs = {k: v[keep] if torch.is_tensor(v) and v.dim() else v for k, v in kwargs.items()}
        step_ids = token.unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
    return new


def nucleus(temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None):
    """A `pick` for `greedy`/`generate` that samples each row's token from softmax(logits / temperature) restricted
    to its nucleus: the most probable tokens whose mass first reaches `top_p` (the most probable token always
    stays), as Hugging Face's `top_p` with `top_k=0`. Seeded through `generator` (on the logits' device)."""
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"nucleus sampling needs temperature > 0 and 0 < top_p ≤ 1; got {temperature}, {top_p}")

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, -1)
        p, order = probs.sort(-1, descending=True)
        p = p * ((p.cumsum(-1) - p) < top_p)  # the mass before a token is below top_p: it is in the nucleus
        return order.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(1)

    return pick


# SPEC §6 index swap: the evidence (prompt) and evidence features (side input) an item is evaluated with
CONDITIONS = {"clean": ("evidence", "features"), "shuffled": ("evidence_shuffled", "features_shuffled"),
              "corrupt": ("evidence_corrupt", "features_corrupt"),
              "features_shuffled": ("evidence", "features_shuffled")}
INDEX_SWAP = {"wordnet_qa": ("shuffled", "corrupt")}  # tasks with swapped-index conditions, and those conditions
# clean evidence text, another query's evidence features: isolates what a controller takes from the features.
# easy_vqa (issue 17's image-swap control): the question as it is, another image's features (image_swap).
FEATURE_SWAP = {"wordnet_qa": ("features_shuffled",), "easy_vqa": ("features_shuffled",)}
IMAGE_SWAP_SEED = 0


def image_swap(items: list[dict], seed: int = IMAGE_SWAP_SEED) -> list[dict]:
    """easy_vqa items with another image's features: the distinct images of `items` are put in a seeded random
    order and each takes the next one's feature row (a cyclic shift: no image keeps its own, every image's features
    are used once); questions about the same image all get the same other image. The question text is unchanged."""
    images = sorted({it["feature_row"] for it in items})
    if len(images) < 2:
        raise ValueError(f"the image swap needs items about at least 2 images; these {len(items)} show {len(images)}")
    order = [images[i] for i in np.random.default_rng(seed).permutation(len(images))]
    other = {row: order[(k + 1) % len(order)] for k, row in enumerate(order)}
    return [{**it, "feature_row": other[it["feature_row"]], "image_swapped_from": it["feature_row"]} for it in items]


def check_condition(task: str, condition: str) -> None:
    if condition not in CONDITIONS:
        raise ValueError(f"condition {condition!r} is not allowed; expected one of {sorted(CONDITIONS)}")
    if condition != "clean" and condition not in INDEX_SWAP.get(task, ()) + FEATURE_SWAP.get(task, ()):
        raise ValueError(f"task {task!r} has no condition {condition!r}: index-swap conditions exist for "
                         f"{sorted(INDEX_SWAP)} only; other tasks are evaluated with condition 'clean'")


def with_condition(task: str, items: list[dict], condition: str, split: str = "test") -> list[dict]:
    """The items as seen under an index-swap condition: `evidence` and `features` replaced by the condition's
    variants (another query's passages for `shuffled`, answers replaced for `corrupt`), all else unchanged, so
    the same prompt builder, side-input layout and scoring apply."""
    check_condition(task, condition)
    if condition == "clean":
        return items
    if task == "easy_vqa":  # features_shuffled: features of another image, computed here (no prepared variants)
        return image_swap(items)
    evidence, features = CONDITIONS[condition]
    for it in items:
        if evidence not in it or features not in it:
            raise ValueError(f"{task} item {it['id']!r} of split {split!r} has no {evidence!r}/{features!r}: the "
                             "index-swap variants are built for the test split only (bem data prepare)")
    return [{**it, "evidence": it[evidence], "features": it[features]} for it in items]


def evaluate_task(model, tokenizer, task: str, n: int | None, split: str = "test", batch_size: int = 16,
                  root: Path | None = None, layout: dict | None = None,
                  condition: str = "clean", mask: torch.Tensor | None = None,
                  decoding: str = "auto") -> tuple[list[dict], dict]:
    """Per-item rows (id, prediction, scores) and the task's summary (means and corpus scores).

    With a side-input `layout` (see tasks.side_layout) each item's side vector goes to the controller.
    `condition` (SPEC §6 index swap, wordnet_qa only): 'clean', or 'shuffled' / 'corrupt', which build the
    prompt and the side features from the item's swapped evidence; same items, order and scoring as clean.
    `mask` (r,): the mask m every item is generated with (an expert bank's expert, bem.experts); None: none.
    `decoding`: see `generate` (the replies do not depend on it).
    """
    spec = SPECS[task]
    check_condition(task, condition)  # before reading any data
    items = with_condition(task, load_items(task, split, n, root), condition, split)
    side = torch.tensor(side_vectors(task, items, layout, root)) if layout else None
    start = time.perf_counter()
    predictions = generate(model, tokenizer, [spec.prompt(it) for it in items], spec.max_new_tokens, batch_size,
                           side=side, desc=task if condition == "clean" else f"{task} {condition}",
                           bem_mask=None if mask is None else mask.expand(len(items), -1), decoding=decoding)
    rows = [{"task": task, "id": it["id"], "prediction": p, "scores": spec.score(p, it),
             "meta": item_meta(task, it),
             "reference": spec.reference(it)} for it, p in zip(items, predictions)]
    names = rows[0]["scores"].keys()
    summary = {"task": task, "split": split, "condition": condition, "n": len(rows), "primary": spec.primary,
               "means": {k: sum(r["scores"][k] for r in rows) / len(rows) for k in names},
               "corpus": spec.corpus(predictions, items), "seconds": round(time.perf_counter() - start, 3)}
    return rows, summary


def zero_shot(model_name: str, tasks: list[str], n: int, out: Path, batch_size: int = 16) -> dict:
    """Score the frozen base model on each task; finished tasks are kept and skipped on a rerun."""
    from bem.models import load_base

    from bem.data.prepare import data_fingerprints

    fingerprints = data_fingerprints(tasks)  # checks every file against the manifest's sha256, as `bem run` does
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_base(model_name)
    summaries = {}
    for task in tasks:
        fingerprint = fingerprints[task]
        done = out / f"{task}.summary.json"
        if done.is_file():
            summary = json.loads(done.read_text())
            if summary.get("n_requested") == n and summary.get("data_fingerprint") == fingerprint \
                    and summary.get("model") == model_name:
                log.info("%s: already scored, skipped", task)
                summaries[task] = _rescore_corpus(summary, out / f"{task}.items.jsonl", task, n, done)
                continue
        rows, summary = evaluate_task(model, tokenizer, task, n, batch_size=batch_size)
        summary.update(n_requested=n, data_fingerprint=fingerprint, model=model_name, corpus_on="hypothesis")
        _atomic_write(out / f"{task}.items.jsonl", "".join(dumps(r) + "\n" for r in rows))
        _atomic_write(done, json.dumps(summary, indent=2, sort_keys=True))
        summaries[task] = summary
    for other in sorted(out.glob("*.summary.json")):  # the table lists every task scored in this folder
        task = other.name.removesuffix(".summary.json")
        stored = json.loads(other.read_text())
        if task not in summaries and stored.get("n_requested") == n and stored.get("model") == model_name:
            summaries[task] = stored
    order = list(SPECS)
    summaries = dict(sorted(summaries.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    _atomic_write(out / "summary.md", summary_table(summaries, model_name, n))
    return summaries


def _rescore_corpus(summary: dict, items_path: Path, task: str, n: int, summary_path: Path) -> dict:
    """Corpus scores of a finished task recomputed from its stored replies on the hypotheses the per-item scores use
    (`TaskSpec.hypothesis`); summaries written before that scored the raw replies. Rewrites the summary if they moved."""
    if summary.get("corpus_on") == "hypothesis" or not summary.get("corpus"):
        return summary
    predictions = {r["id"]: r["prediction"] for r in map(json.loads, items_path.read_text().splitlines())}
    items = load_items(task, summary.get("split", "test"), n)
    summary = {**summary, "corpus": SPECS[task].corpus([predictions[it["id"]] for it in items], items),
               "corpus_on": "hypothesis"}
    _atomic_write(summary_path, json.dumps(summary, indent=2, sort_keys=True))
    log.info("%s: corpus scores recomputed on the scored hypotheses: %s", task, summary["corpus"])
    return summary


def summary_table(summaries: dict, model_name: str, n: int) -> str:
    lines = [f"Zero-shot {model_name} (frozen, greedy), test split, up to {n} items per task.",
             "Produced by `bem eval --zero-shot`; per-item scores are in `<task>.items.jsonl`.", "",
             "| task | items | primary | mean over items (rates ×100; chrF, BLEU as sacrebleu) | corpus |", "|---|---|---|---|---|"]
    for task, s in summaries.items():
        means = ", ".join(f"{k} {100 * v:.1f}" if k not in ("chrf", "bleu") else f"{k} {v:.1f}"
                          for k, v in s["means"].items())
        corpus = ", ".join(f"{k} {v:.1f}" for k, v in s["corpus"].items()) or "—"
        lines.append(f"| `{task}` | {s['n']} | {s['primary']} | {means} | {corpus} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

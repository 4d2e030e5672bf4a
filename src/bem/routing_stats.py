"""Is routing alive? How far a routed BEM's codes, gates and FiLM move across items and chunks.

A teacher-forced forward over each prompt + its reply routes every token with the code that cached
generation used for it (the causality rule, SPEC §2), so no generation is needed. For every (item,
segment) with a real token (the prompt code, then each chunk) the routing vector is read from the
runtime, and per routed site:

- `code_std`: the std of c over items × segments, averaged over the site's code directions;
- `code_mean_abs_dev`: mean |c − 1| (0 for c ≡ 1, i.e. LoRA); `code_min`, `code_max`;
- per head-gated site (PT1/V2): `gate_min`, `gate_max`, `gate_mean_abs_dev` (mean |g − 1|);
- per FiLM block (PT4/V4): `gamma_min`, `gamma_max`, `gamma_mean_abs_dev` (mean |γ − 1|), `beta_min`,
  `beta_max`, `beta_mean_abs` (mean |β|);

and for the whole system (site `all`): `switch_rate` = accepted chunk-code replacements / chunk boundaries
where a replacement could happen (`runtime.switches`; absent when no reply crossed a boundary),
`switches`, `boundaries`, `samples`, `items`, the largest deviation of each kind and `moved`: 0 when every
site's mean |c − 1|, every gate's mean |g − 1| and every FiLM block's mean |γ − 1| and mean |β| are below
`MOVED_THRESHOLD`, so the system routes every token like c ≡ 1 (static LoRA) would.

With side inputs that differ between items (wordnet_qa's evidence features, easy_vqa's image features), the pass is
repeated with every item given the previous item's side inputs (the prompt and reply unchanged), and `all` gets
`feature_shift`: the mean |c(swapped side) − c(own side)| over the code entries of every (item, segment), and
`feature_shift_ratio`: that over `code_mean_std`, i.e. how far swapping only the side inputs moves the codes, in
units of their spread over items and chunks (near 0: the controller ignores its side inputs); with head gates (PT1/V2,
whose gate-shaping term reads the evidence features directly) `gate_feature_shift` and `gate_feature_shift_ratio`
likewise for the gates (over the std of g over items and chunks, mean over gate entries). This measures the
controller itself; the features-only swap of the index-swap analysis measures the replies, which a small code
change need not flip.

With a top-k mask (V1) the code is c·m, so masked directions count as |0 − 1| = 1: such a system routes
(chooses directions per context) from its first step.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bem.module.attach import bem_layers, bem_runtime, find_blocks
from bem.data.batches import prompt_ids
from bem.data.prepare import data_root, read_split
from bem.evaluate import forward_parameters
from bem.tasks import SPECS, side_vectors

MOVED_THRESHOLD = 0.01
"""Below this mean deviation from identity (|c − 1|, |g − 1|, |γ − 1|, |β|) everywhere, codes did not move."""


def _site_names(model) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
    """Labels of the controller's outputs: code index → site, gate index → site, FiLM index → block."""
    codes, gates = {}, {}
    for name, layer in bem_layers(model).items():
        if layer.site_index is not None:
            codes[layer.site_index] = name
        if layer.gate_index is not None:
            gates[layer.gate_index] = name
    config = model.bem_config
    prefix, blocks = find_blocks(model)
    film = {i: f"{prefix}.{block}" for i, block in enumerate(range(config.read_layer, len(blocks)))} if config.film else {}
    return codes, gates, film


@torch.no_grad()
def _routed_segments(model, tokenizer, prompts: list[str], replies: list[str], side: torch.Tensor | None,
                     batch_size: int) -> tuple[torch.Tensor, int, int]:
    """Every (item, segment)'s routing vector (S, W) over the items' real tokens, with the switches accepted
    and the chunk boundaries at which a switch could have happened."""
    runtime = bem_runtime(model)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    replies_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]) + len(replies_ids[i]))
    device = next(model.parameters()).device
    keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    samples, seen = [], {}
    read = runtime.read

    def record(hidden):
        read(hidden)
        seen["codes"], seen["segment"], seen["valid"] = runtime._codes, runtime._segment, runtime._call.valid

    switches, boundaries = runtime.switches, 0
    runtime.read = record
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [encoded[i] + replies_ids[i] for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, tokens in enumerate(rows):  # left padding, as in generation
                ids[row, width - len(tokens):] = torch.tensor(tokens)
                mask[row, width - len(tokens):] = 1
            kwargs = {"bem_prompt_len": torch.tensor([len(encoded[i]) for i in idx], device=device)}
            if side is not None:
                kwargs["bem_side"] = side[idx].to(device)
            seen.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs, **keep_logits)
            codes, segment, valid = seen["codes"], seen["segment"], seen["valid"]
            held = torch.zeros(codes.shape[:2], dtype=torch.long, device=codes.device)
            used = held.scatter_add_(1, segment, valid.long()) > 0  # segments holding a real token
            samples.append(codes[used].float().cpu())
            last = torch.where(valid, segment, 0).amax(1)
            # the first chunk after the prompt keeps the prompt code (runtime.read): not a switch point
            boundaries += int((last - int(runtime.state.use_prompt)).clamp_min(0).sum())
    finally:
        runtime.read = read
    return torch.cat(samples), runtime.switches - switches, boundaries


def measure_routing(model, tokenizer, prompts: list[str], replies: list[str], side: torch.Tensor | None = None,
                    batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Routing statistics of a routed BEM model over items (prompt + stored reply, teacher-forced).

    `side`: (items, side_dim) side inputs in item order, as given to generation. Returns {site: {stat: value}}
    (see the module docstring): code sites by module name, `gate:<site>`, `film:<block>` and `all`.
    """
    runtime = bem_runtime(model)
    controller = runtime.controller
    if controller is None:
        raise ValueError(f"{type(model).__name__} has a static BEM (bem.controller = "
                         f"{model.bem_config.controller!r}): there is no routing to measure")
    if len(prompts) != len(replies) or not prompts:
        raise ValueError(f"measure_routing needs one reply per prompt and at least one item, got {len(prompts)} "
                         f"prompts and {len(replies)} replies")
    if side is not None and side.shape[0] != len(prompts):
        raise ValueError(f"side has {side.shape[0]} rows but there are {len(prompts)} items")
    was_training = model.training
    model.eval()
    spans = controller.heads.spans
    swapped = None
    try:
        vectors, switches, boundaries = _routed_segments(model, tokenizer, prompts, replies, side, batch_size)
        if side is not None and len(prompts) > 1 and not torch.equal(side, side.roll(1, 0)):
            # the same items and replies, each with the previous item's side inputs: how far do the codes follow them?
            before = runtime.switches
            swapped = _routed_segments(model, tokenizer, prompts, replies, side.roll(1, 0), batch_size)[0]
            runtime.switches = before  # the counter keeps the real pass only
    finally:
        model.train(was_training)
    codes, gates, film = _site_names(model)
    out: dict[str, dict[str, float]] = {}

    def piece(offset: int, width: int) -> torch.Tensor:
        return vectors[:, offset:offset + width].double()

    for index, (offset, width) in enumerate(spans["code"]):
        c = piece(offset, width)
        out[codes[index]] = {"code_std": float(c.std(0, unbiased=False).mean()),
                             "code_mean_abs_dev": float((c - 1).abs().mean()),
                             "code_min": float(c.min()), "code_max": float(c.max())}
    for index, (offset, width) in enumerate(spans["gate"]):
        g = piece(offset, width)
        out[f"gate:{gates[index]}"] = {"gate_min": float(g.min()), "gate_max": float(g.max()),
                                       "gate_mean_abs_dev": float((g - 1).abs().mean())}
    for index, (offset, width) in enumerate(spans["film"]):
        gamma, beta = piece(offset, width).unflatten(-1, (2, -1)).unbind(-2)
        out[f"film:{film[index]}"] = {"gamma_min": float(gamma.min()), "gamma_max": float(gamma.max()),
                                      "gamma_mean_abs_dev": float((gamma - 1).abs().mean()),
                                      "beta_min": float(beta.min()), "beta_max": float(beta.max()),
                                      "beta_mean_abs": float(beta.abs().mean())}
    sites = [s for s in out.values() if "code_std" in s]
    summary = {"items": float(len(prompts)), "samples": float(len(vectors)), "switches": float(switches),
               "boundaries": float(boundaries),
               "code_max_mean_abs_dev": max(s["code_mean_abs_dev"] for s in sites),
               "code_mean_std": sum(s["code_std"] for s in sites) / len(sites)}
    if boundaries:
        summary["switch_rate"] = switches / boundaries
    if swapped is not None:  # rows are the same (item, segment)s: segments follow positions, not codes
        for kind, prefix in (("code", "feature_shift"), ("gate", "gate_feature_shift")):
            if not spans[kind]:
                continue
            columns = torch.cat([torch.arange(offset, offset + width) for offset, width in spans[kind]])
            own = vectors[:, columns].double()
            shift, spread = float((swapped[:, columns].double() - own).abs().mean()), float(own.std(0, unbiased=False).mean())
            summary[prefix] = shift
            if spread > 0:
                summary[f"{prefix}_ratio"] = shift / spread
    if spans["gate"]:
        summary["gate_max_mean_abs_dev"] = max(s["gate_mean_abs_dev"] for k, s in out.items() if k.startswith("gate:"))
    if spans["film"]:
        summary["film_max_mean_abs_dev"] = max(max(s["gamma_mean_abs_dev"], s["beta_mean_abs"])
                                               for k, s in out.items() if k.startswith("film:"))
    deviations = [v for k, v in summary.items() if k.endswith("max_mean_abs_dev")]
    summary["moved"] = float(max(deviations) >= MOVED_THRESHOLD)
    out["all"] = summary
    return out


def measure_task_routing(model, tokenizer, task: str, rows: list[dict], layout: dict | None = None,
                         root: Path | None = None, split: str = "test", batch_size: int = 16) -> dict[str, dict[str, float]]:
    """`measure_routing` over a task's evaluated rows ({"id", "prediction"}, as `evaluate_task` returns them):
    the items' prompts and side inputs (with the side-input `layout` the unit was evaluated with) are rebuilt
    from the prepared split, and each item's stored reply is its continuation."""
    spec = SPECS[task]
    by_id = {it["id"]: it for it in read_split(task, split, root)}
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise ValueError(f"{task} rows {missing[:5]} are not items of the {split!r} split under {root or data_root()}")
    items = [by_id[r["id"]] for r in rows]
    side = torch.tensor(side_vectors(task, items, layout, root)) if layout else None
    return measure_routing(model, tokenizer, [spec.prompt(it) for it in items], [r["prediction"] for r in rows],
                           side=side, batch_size=batch_size)

"""Prompts and batches: chat-template prompts, loss on target tokens only, padding, side inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Example:
    prompt: str  # the user turn
    target: str  # the assistant's answer (scored; the only tokens with loss)
    side: tuple[float, ...] | None = None  # per-example side inputs (evidence or image features)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn through the model's chat template, ending with the assistant header."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def collate(tokenizer, examples: list[Example], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 off target), bem_prompt_len, bem_side."""
    if not examples:
        raise ValueError("collate needs at least one example")
    rows = []
    for ex in examples:
        prompt = prompt_ids(tokenizer, ex.prompt)
        target = tokenizer(ex.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if max_length is not None:
            target = target[: max(1, max_length - len(prompt))]
        rows.append((prompt, target))
    width = max(len(p) + len(t) for p, t in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p):n] = torch.tensor(t)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "bem_prompt_len": torch.tensor([len(p) for p, _ in rows])}
    sides = [ex.side for ex in examples]
    if any(s is not None for s in sides):
        if any(s is None for s in sides) or len({len(s) for s in sides}) != 1:
            raise ValueError("side inputs must be given for every example of a batch, all of one width")
        batch["bem_side"] = torch.tensor(sides, dtype=torch.float32)
    return batch

"""Prompts and batches: chat-template prompts, loss on target tokens only, padding, side inputs, batch schedules."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Example:
    prompt: str  # the user turn
    target: str  # the assistant's answer (scored; the only tokens with loss)
    side: tuple[float, ...] | None = None  # per-example side inputs (evidence or image features)
    mask: tuple[float, ...] | None = None  # per-example mask m on the r basis directions (an expert bank's block)


@dataclass(frozen=True, eq=False)
class Encoded:
    """An example as token ids: `ids` = chat-template prompt + target + eos, of which the first `prompt_len`
    carry no loss."""
    ids: np.ndarray
    prompt_len: int
    side: tuple[float, ...] | None = None
    mask: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn through the model's chat template, ending with the assistant header."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def encode(tokenizer, examples: Sequence[Example], max_length: int | None = None) -> list[Encoded]:
    """Each example as `prompt_ids` + its target and eos, the target cut to fit `max_length` (never below one token;
    the prompt is never cut). One batched template render and tokenizer call for all examples."""
    if not examples:
        return []
    prompts = tokenizer.apply_chat_template([[{"role": "user", "content": ex.prompt}] for ex in examples],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    targets = tokenizer([ex.target + tokenizer.eos_token for ex in examples], add_special_tokens=False)["input_ids"]
    rows = []
    for ex, prompt, target in zip(examples, prompts, targets):
        if max_length is not None:
            target = target[: max(1, max_length - len(prompt))]
        rows.append(Encoded(np.asarray(list(prompt) + list(target), dtype=np.int64), len(prompt), ex.side, ex.mask))
    return rows


_ENCODED: dict[tuple, list[Encoded]] = {}
_ENCODED_KEEP = 4  # data sets kept per process (each ~2.5 MB at the default budget)


def encode_cached(tokenizer, examples: Sequence[Example], max_length: int | None) -> list[Encoded]:
    """`encode`, kept for the process under (tokenizer name, chat template, vocabulary size, end token, max_length,
    the examples themselves): the runner trains many units on the same examples, and encoding 4,000 takes ~2 s."""
    key = (tokenizer.name_or_path, tokenizer.chat_template, len(tokenizer), tokenizer.eos_token, max_length,
           tuple(examples))
    if key not in _ENCODED:
        while len(_ENCODED) >= _ENCODED_KEEP:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = encode(tokenizer, examples, max_length)
    return _ENCODED[key]


def pad_batch(rows: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 off target), bem_prompt_len, and bem_side and
    bem_mask when the examples carry them."""
    if not rows:
        raise ValueError("a batch needs at least one example")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.from_numpy(r.ids)
        labels[i, r.prompt_len:n] = ids[i, r.prompt_len:n]
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "bem_prompt_len": torch.tensor([r.prompt_len for r in rows])}
    sides = [r.side for r in rows]
    if any(s is not None for s in sides):
        if any(s is None for s in sides) or len({len(s) for s in sides}) != 1:
            raise ValueError("side inputs must be given for every example of a batch, all of one width")
        batch["bem_side"] = torch.tensor(np.asarray(sides, dtype=np.float32))
    masks = [r.mask for r in rows]
    if any(m is not None for m in masks):
        if any(m is None for m in masks) or len({len(m) for m in masks}) != 1:
            raise ValueError("masks must be given for every example of a batch, all of one width (the rank)")
        batch["bem_mask"] = torch.tensor(np.asarray(masks, dtype=np.float32))
    return batch


def collate(tokenizer, examples: list[Example], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch of `examples`: `pad_batch` of their `encode`."""
    if not examples:
        raise ValueError("collate needs at least one example")
    return pad_batch(encode(tokenizer, examples, max_length), tokenizer.pad_token_id)


WINDOW = 32
"""Length batching sorts windows of WINDOW batches' worth of examples: wide enough that most batches hold examples
of near one length, narrow enough that each stretch of steps still mixes the data set."""


class BatchSchedule:
    """Which examples make the g-th micro-batch of a unit, a fixed function of (seed, g), so a run resumed from a
    checkpoint sees the batches an uninterrupted one does. Under DDP, micro-batch `micro` of step k on `rank` is
    g = (k · grad_accum + micro) · world + rank.

    random: one seeded permutation read as an endless stream: batch g is its examples g·B … g·B + B − 1 (mod n).
    length: epoch e is a permutation seeded by (seed, e), cut into windows of WINDOW·B examples; each window is sorted
    by length (stable) and cut into batches of B, taken in an order shuffled by the same generator. Every example
    appears once per epoch; when B does not divide n, the epoch's last window ends in one batch of n mod B.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mode: str = "length"):
        if mode not in ("length", "random"):
            raise ValueError(f"batching = {mode!r} is not allowed; expected 'length' or 'random'")
        if not len(lengths) or batch_size < 1:
            raise ValueError(f"a batch schedule needs examples and batch_size >= 1, got {len(lengths)} examples "
                             f"and batch_size {batch_size}")
        self.lengths, self.batch_size, self.seed, self.mode = np.asarray(lengths), batch_size, seed, mode
        self.order = np.random.default_rng(seed).permutation(len(lengths))
        self.per_epoch = -(-len(lengths) // batch_size)
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def __call__(self, g: int) -> list[int]:
        n, size = len(self.lengths), self.batch_size
        if self.mode == "random":
            at = g * size % n
            return [int(self.order[(at + i) % n]) for i in range(size)]
        epoch, j = divmod(g, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = epoch, self._length_batches(epoch)
        return [int(i) for i in self._epoch[1][j]]

    def _length_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order, size = rng.permutation(len(self.lengths)), self.batch_size
        batches = []
        for start in range(0, len(order), WINDOW * size):
            window = order[start:start + WINDOW * size]
            window = window[np.argsort(self.lengths[window], kind="stable")]
            cut = [window[i:i + size] for i in range(0, len(window), size)]
            batches += [cut[i] for i in rng.permutation(len(cut))]
        return batches


def pad_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens over padded tokens (batch size × longest example, summed) of `batches` of example indices."""
    real = sum(int(lengths[i]) for b in batches for i in b)
    return real / sum(len(b) * max(int(lengths[i]) for i in b) for b in batches)

"""The router's environment (SPEC §4): episodes, greedy rollouts in one routing stream, rewards from real metrics.

- `mixed_stream`: the four tasks' items in a seeded order with the task hidden: the router sees only the prompt text
  and the side vector (wordnet_qa's evidence features in the shared layout `LAYOUT`, zeros for the other tasks).
- `composite_items`: replies in two parts that need different experts, where switching mid-sequence pays.
- `rollout`: greedy replies to every part of an episode, all parts in one KV cache (one routing stream), batched.
- `part_score`, `reward`: R = mean over parts of the task's metric on the generated text − λ · switches.

The environment only calls the model with the usual kwargs (`bem_prompt_len`, `bem_side`); whatever routes codes
inside the forward (a controller, a router's policy, nothing) is not its business.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import chain, zip_longest
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bem.data.batches import prompt_ids
from bem.data.prepare import SPLITS, data_root, split_lines
from bem.errors import DataError
from bem.evaluate import cache_name, forward_parameters
from bem.tasks import SPECS, load_items, side_layout, side_vectors, side_width

ROUTER_TASKS = ("wordnet_qa", "bible_translate", "wordnet_define", "json_format")
"""The tasks with an expert in the bank, in expert order."""
LAYOUT = side_layout(list(ROUTER_TASKS))
"""Where each task's side inputs sit in the side vector: wordnet_qa's 5 evidence features, nothing else."""
SECOND = ("json_format", "wordnet_define")
"""Tasks of a composite's second part: "give the JSON entry" and "define the word"."""
LEAD_IN = "Next: "
"""Put before the task's own prompt in a composite's second user turn (and nothing else is changed)."""
MIN_WORD = 4
"""Letters a word needs to be a second part's subject (WordNet also has entries for "he", "in", "a")."""
_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class Part:
    """One user turn of an episode; its reply is scored by `task`'s metric against `item`."""

    task: str
    item: dict = field(hash=False)  # the task's item, as in its split file
    prompt: str  # the user turn's text
    side: tuple[float, ...]  # the episode's side vector (from part 1's task), in LAYOUT


@dataclass(frozen=True)
class Episode:
    id: str
    parts: tuple[Part, ...]

    @property
    def side(self) -> tuple[float, ...]:
        return self.parts[0].side


# --- episodes ------------------------------------------------------------------------------------
def mixed_stream(split: str, n: int, seed: int = 0, root: Path | None = None) -> list[Episode]:
    """n one-part episodes of the four tasks' `split`, in an order shuffled by `seed`.

    Balanced: n // 4 items per task, plus one for each of the first n % 4 tasks of ROUTER_TASKS (fewer where a split
    is smaller). A task's items are `load_items` (evenly spread through its split), so `seed` changes the order only.
    Ids are "<task>:<item id>" (wordnet_define and json_format items share synset ids).
    """
    _check_split(split)
    _check_n(n)
    episodes = []
    for i, task in enumerate(ROUTER_TASKS):
        k = n // 4 + (i < n % 4)
        if k:
            items = load_items(task, split, k, root)
            episodes += [Episode(_key(task, it), (Part(task, it, SPECS[task].prompt(it), side),))
                         for it, side in zip(items, _sides(task, items, root))]
    return [episodes[i] for i in np.random.default_rng(seed).permutation(len(episodes))]


def composite_items(split: str, n: int | None, root: Path | None = None) -> list[Episode]:
    """n two-part episodes of `split` (n = None: one per bible_translate and wordnet_qa item of the split).

    Part 1 alternates a bible_translate item (positions 0, 2, …: ceil(n/2) items) and a wordnet_qa item (n // 2),
    each `load_items` of the split (fewer where it is smaller). Part 2 is a `SECOND` task's item of the same split,
    the task picked by a hash of part 1's id, about a word of part 1's reference reply: the verse's English text
    (bible_translate), else the answers, then the question (wordnet_qa). The word is the longest (>= MIN_WORD
    letters, the first on a tie) of the first of those texts that has any word with an entry in the split; its first
    entry in file order (nouns first) is the item. Where no word matches, part 2 is a hash-chosen item of the same
    split and task. Its prompt is LEAD_IN + the task's own prompt. Both parts carry part 1's side vector.
    Id: "<task 1>:<id 1>+<task 2>:<id 2>".
    """
    _check_split(split)
    if n is not None:
        _check_n(n)
    n_bible, n_qa = (None, None) if n is None else (-(-n // 2), n // 2)
    bible = load_items("bible_translate", split, n_bible, root)
    qa = load_items("wordnet_qa", split, n_qa, root) if n_qa != 0 else []
    firsts = [x for x in chain.from_iterable(zip_longest(
        [("bible_translate", it) for it in bible], [("wordnet_qa", it) for it in qa])) if x is not None]
    episodes = []
    for task, item in firsts:
        side = _sides(task, [item], root)[0]
        first = Part(task, item, SPECS[task].prompt(item), side)
        second = _second_part(split, task, item, side, root)
        episodes.append(Episode(f"{_key(task, item)}+{_key(second.task, second.item)}", (first, second)))
    return episodes


def _second_part(split: str, task: str, item: dict, side: tuple[float, ...], root: Path | None) -> Part:
    second = SECOND[_hash(f"second:{_key(task, item)}") % len(SECOND)]
    items, index = _entries(second, split, root)
    texts = [item["target"]] if task == "bible_translate" else [*item["answers"], item["question"]]
    for text in texts:
        words = [w for w in _WORD.findall(text.lower()) if w in index]
        if words:
            entry = index[max(words, key=len)]
            break
    else:
        entry = items[_hash(f"fallback:{_key(task, item)}") % len(items)]
    return Part(second, entry, LEAD_IN + SPECS[second].prompt(entry), side)


def check_composite_leakage(root: Path | None = None) -> dict[str, int]:
    """Build every composite of every split and count what must be 0: parts whose item is not its task's item of the
    composite's own split alone (`cross_split`), repeated ids over all splits (`duplicate_ids`), and dev / test
    composites that share a part item (task, id) with a train composite (`dev_in_train`, `test_in_train`).
    Also reports `composites_<split>`, the number built."""
    composites = {s: composite_items(s, None, root) for s in SPLITS}
    own = {(s, t): {it["id"] for it in _split_items(t, s, root)} for s in SPLITS for t in ROUTER_TASKS}
    cross = sum(p.item["id"] not in own[s, p.task] or any(p.item["id"] in own[o, p.task] for o in SPLITS if o != s)
                for s in SPLITS for ep in composites[s] for p in ep.parts)
    ids = [ep.id for s in SPLITS for ep in composites[s]]
    train = {(p.task, p.item["id"]) for ep in composites["train"] for p in ep.parts}
    shared = {s: sum(any((p.task, p.item["id"]) in train for p in ep.parts) for ep in composites[s])
              for s in ("dev", "test")}
    return {**{f"composites_{s}": len(composites[s]) for s in SPLITS}, "cross_split": cross,
            "duplicate_ids": len(ids) - len(set(ids)), "dev_in_train": shared["dev"], "test_in_train": shared["test"]}


def _split_items(task: str, split: str, root: Path | None) -> list[dict]:
    return _entries(task, split, root)[0] if task in SECOND else load_items(task, split, None, root)


def _entries(task: str, split: str, root: Path | None) -> tuple[list[dict], dict[str, dict]]:
    """A SECOND task's items of `split` and its index word → first entry, kept per file version (a train split
    is ~100k lines)."""
    path = Path(root if root is not None else data_root()) / task / f"{split}.jsonl"
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    items, index = _read_entries(task, split, str(path.parent.parent), stamp)
    if not items:
        raise DataError(f"{path} holds no items; composites of split {split!r} need {task} items of that split")
    return items, index


@lru_cache(maxsize=12)
def _read_entries(task: str, split: str, root: str, stamp: tuple | None) -> tuple[list[dict], dict[str, dict]]:
    items = [json.loads(line) for line in split_lines(task, split, Path(root))]
    index: dict[str, dict] = {}
    for it in items:
        word = (it["word"] if task == "wordnet_define" else it["target"]["word"]).lower()
        if len(word) >= MIN_WORD and _WORD.fullmatch(word):
            index.setdefault(word, it)
    return items, index


def _sides(task: str, items: list[dict], root: Path | None) -> list[tuple[float, ...]]:
    return [tuple(float(x) for x in row) for row in side_vectors(task, items, LAYOUT, root)]


def _key(task: str, item: dict) -> str:
    return f"{task}:{item['id']}"


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


# --- rollouts ------------------------------------------------------------------------------------
_PLACEHOLDERS = ("PLACEHOLDER-REPLY", "Another placeholder reply.")


def turn_ids(tokenizer, prompts: Sequence[str]) -> list[int]:
    """The tokens that follow the assistant's reply to prompts[-2]: the end of that turn, the user turn prompts[-1]
    and the assistant header. For ChatML (SmolLM2): `<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n`.

    Derived from the chat template: the conversation (earlier replies are placeholders) must render as the
    generation prompt of the turns before, then the reply, then a text that does not depend on the reply; that text,
    tokenised alone, must be how the whole conversation's tokens end. Otherwise a ValueError says which check failed.
    """
    if len(prompts) < 2:
        raise ValueError(f"turn_ids needs the prompts of at least two user turns, got {len(prompts)}")
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    tails, texts = [], []
    for reply in _PLACEHOLDERS:
        history = [m for p in prompts[:-1] for m in ({"role": "user", "content": p},
                                                       {"role": "assistant", "content": reply})]
        head = tokenizer.apply_chat_template(history[:-1], add_generation_prompt=True, tokenize=False) + reply
        text = tokenizer.apply_chat_template(history + [{"role": "user", "content": prompts[-1]}],
                                             add_generation_prompt=True, tokenize=False)
        if not text.startswith(head):
            raise ValueError(f"cannot derive the next-turn tokens from {name}'s chat template: a conversation does not "
                             "render as the generation prompt of its earlier turns followed by the assistant's reply "
                             "(the template drops or rewrites earlier turns)")
        tails.append(text[len(head):])
        texts.append(text)
    if tails[0] != tails[1]:
        raise ValueError(f"cannot derive the next-turn tokens from {name}'s chat template: what follows an assistant "
                         f"reply depends on the reply's text ({tails[0]!r} vs {tails[1]!r})")
    ids = tokenizer(tails[0], add_special_tokens=False)["input_ids"]
    full = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    first = prompt_ids(tokenizer, prompts[0])
    if not ids or full[-len(ids):] != ids or full[:len(first)] != first:
        raise ValueError(f"cannot derive the next-turn tokens from {name}'s chat template: the next turn "
                         f"{tails[0]!r} tokenised alone is not how the whole conversation's tokens end, or the "
                         "conversation's tokens do not start with the first prompt's")
    return ids


@dataclass(frozen=True)
class Rollout:
    """An episode's greedy replies and where they sit in its row's stream.

    `ids` are the real tokens the row's cache holds, in order (index = the position routing counts, from the first
    prompt token; pads are not counted), then the last reply's last token, which is generated but never fed. A reply
    that ended with an end token holds, at its last position, the end of turn the template writes (the same token for
    ChatML), since the next turn is fed from the template.
    """

    id: str  # the episode's id
    replies: tuple[str, ...]  # per part, decoded without special tokens
    tokens: tuple[tuple[int, ...], ...]  # per part, the generated ids (its end token included if it emitted one)
    spans: tuple[tuple[int, int], ...]  # per part, [start, end) of the reply in `ids`
    ids: tuple[int, ...]  # the row's stream of real tokens (see above)
    batch: int  # the batch the episode ran in and its row there: per-row router records map back through these
    row: int

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@torch.no_grad()
def rollout(model, tokenizer, episodes: Sequence[Episode], batch_size: int = 16,
            max_new_tokens: int | None = None) -> list[Rollout]:
    """Greedy replies (argmax; any sampling is the router's, inside the forward) to every part of each episode.

    Episodes are sorted by part-1 prompt length (stable) and cut into batches of `batch_size`, one KV cache each.
    Part 1: the chat-template prompts, left-padded, with `bem_prompt_len` (real prompt lengths) and `bem_side`.
    Then, in the same cache, every row's next user turn (`turn_ids`) in one call, and part 2; and so on. A part runs
    until the end token or `max_new_tokens` (default: its task's `SPECS[task].max_new_tokens`). Rows stay in the batch
    (routing state and router records are per row): a row that has ended is fed the pad token with attention 0, so it
    adds no real token and routing skips it; position ids are cumsum(mask) − 1. Returned in the order of `episodes`.
    """
    for ep in episodes:
        _check_episode(ep)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} is not allowed; expected an integer >= 1")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens = {max_new_tokens!r} is not allowed; expected an integer >= 1 or None "
                         "(each task's own)")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (bem.models.load_base uses eos)")
    first = [prompt_ids(tokenizer, ep.parts[0].prompt) for ep in episodes]
    order = sorted(range(len(episodes)), key=lambda i: len(first[i]))
    out: list[Rollout | None] = [None] * len(episodes)
    for b, start in enumerate(tqdm(range(0, len(order), batch_size), desc="rollout", unit="batch", leave=False)):
        idx = order[start:start + batch_size]
        rows = _rollout_batch(model, tokenizer, [episodes[i] for i in idx], [first[i] for i in idx], max_new_tokens)
        for row, (i, r) in enumerate(zip(idx, rows)):
            out[i] = replace(r, batch=b, row=row)
    return out


def _rollout_batch(model, tokenizer, episodes: list[Episode], first: list[list[int]],
                   max_new_tokens: int | None) -> list[Rollout]:
    """One batch, one cache: each part's opening call (prompts, then next turns), then one token per call."""
    from transformers import DynamicCache

    n, pad = len(episodes), tokenizer.pad_token_id
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [tokenizer.eos_token_id])
    forward = _forward(model, DynamicCache(), _bem_kwargs(model, episodes, first, device))
    mask = torch.zeros(n, 0, dtype=torch.long, device=device)
    ids: list[list[int]] = [[] for _ in range(n)]  # real tokens fed, per row
    tokens: list[list[list[int]]] = [[] for _ in range(n)]  # generated ids, per row and part
    spans: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for p in range(max(len(ep.parts) for ep in episodes)):
        live = [len(ep.parts) > p for ep in episodes]
        feed = first if p == 0 else [
            _close(tokens[i][-1], eos) + turn_ids(tokenizer, [q.prompt for q in ep.parts[:p + 1]]) if live[i] else []
            for i, ep in enumerate(episodes)]
        # one call for every row's opening tokens, right-aligned (pads before a shorter turn, not after it): the last
        # column is every live row's last real token, read at -1 as in every call; pads are masked keys anywhere and
        # do not move the position ids (cumsum of the mask) of the real tokens
        width = max(map(len, feed))
        step = torch.full((n, width), pad, dtype=torch.long)
        step_mask = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(feed):
            if f:
                step[i, width - len(f):], step_mask[i, width - len(f):] = torch.tensor(f), 1
            ids[i] += f
        start = [len(x) for x in ids]
        limit = [max_new_tokens or SPECS[ep.parts[p].task].max_new_tokens if live[i] else 0
                 for i, ep in enumerate(episodes)]
        going, reply = list(live), [[] for _ in range(n)]
        while True:
            mask = torch.cat([mask, step_mask.to(device)], 1)
            token = forward(step.to(device), mask).argmax(-1).tolist()
            for i in range(n):
                if going[i]:
                    reply[i].append(token[i])
                    going[i] = token[i] not in eos and len(reply[i]) < limit[i]
            if not any(going):
                break  # each row's last token is fed (or replaced by the template's end of turn) with the next turn
            step = torch.tensor([[t if g else pad] for t, g in zip(token, going)])
            step_mask = torch.tensor([[int(g)] for g in going])
            for i in range(n):
                if going[i]:
                    ids[i].append(token[i])
        for i in range(n):
            if live[i]:
                tokens[i].append(reply[i])
                spans[i].append((start[i], start[i] + len(reply[i])))
    return [Rollout(ep.id, tuple(tokenizer.decode(t, skip_special_tokens=True) for t in tokens[i]),
                    tuple(tuple(t) for t in tokens[i]), tuple(spans[i]), tuple(ids[i] + tokens[i][-1][-1:]), 0, i)
            for i, ep in enumerate(episodes)]


def _close(reply: list[int], eos: set[int]) -> list[int]:
    """What a finished reply still has to feed before the next turn: nothing if it ended with an end token (the next
    turn opens with the template's own end of turn), else its last token, which was generated but not yet fed."""
    return [] if reply[-1] in eos else reply[-1:]


def _forward(model, cache, kwargs: dict):
    """A function (ids, mask) → last-position logits of a cached call, as `bem.evaluate.greedy` calls the model."""
    accepted = forward_parameters(model)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    cache_kw = cache_name(model)

    def call(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = {"position_ids": (mask.cumsum(1) - 1).clamp_min(0)[:, -ids.shape[1]:]} \
            if "position_ids" in accepted else {}
        return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kw: cache}, **last_only,
                     **positions, **kwargs).logits[:, -1]

    return call


def _bem_kwargs(model, episodes: list[Episode], first: list[list[int]], device: torch.device) -> dict:
    runtime = getattr(model, "_bem_runtime", None)
    if runtime is None:
        return {}
    kwargs = {"bem_prompt_len": torch.tensor([len(f) for f in first], device=device)}
    if runtime.config.side_dim:
        if runtime.config.side_dim != side_width(LAYOUT):
            raise ValueError(f"the model's BEM takes side inputs of width side_dim = {runtime.config.side_dim}, but "
                             f"the router's side vector is {side_width(LAYOUT)} wide ({LAYOUT}); use side_dim = "
                             f"{side_width(LAYOUT)} or 0")
        kwargs["bem_side"] = torch.tensor([ep.side for ep in episodes], dtype=torch.float32, device=device)
    return kwargs


# --- rewards -------------------------------------------------------------------------------------
def part_score(task: str, reply: str, item: dict) -> float:
    """A reply's score in [0, 1] by its task's own metric (`SPECS[task].score`): wordnet_qa answer F1,
    bible_translate and wordnet_define sentence chrF / 100, json_format (json_valid + field_em) / 2."""
    _check_task(task)
    scores = SPECS[task].score(reply, item)
    if task == "wordnet_qa":
        return scores["f1"]
    if task == "json_format":
        return (scores["json_valid"] + scores["field_em"]) / 2
    return scores["chrf"] / 100


def reward(rollout: Rollout, episode: Episode, switches: int, lam: float) -> float:
    """R = (1/P) Σ_p part_score(reply_p) − lam · switches, where `switches` are those the router made in the
    episode's row."""
    _check_episode(episode)
    if rollout.id != episode.id or len(rollout.replies) != len(episode.parts):
        raise ValueError(f"rollout {rollout.id!r} ({len(rollout.replies)} replies) is not of episode {episode.id!r} "
                         f"({len(episode.parts)} parts)")
    if switches < 0 or lam < 0:
        raise ValueError(f"switches = {switches!r} and lam = {lam!r} must be >= 0")
    scores = [part_score(p.task, r, p.item) for p, r in zip(episode.parts, rollout.replies)]
    return sum(scores) / len(scores) - lam * switches


# --- checks --------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split = {split!r} is not allowed; expected one of {SPLITS}")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n = {n!r} is not allowed; expected an integer >= 1")


def _check_task(task: str) -> None:
    if task not in ROUTER_TASKS:
        raise ValueError(f"task = {task!r} is not a router task; expected one of {ROUTER_TASKS}")


def _check_episode(episode: Episode) -> None:
    if not episode.parts:
        raise ValueError(f"episode {episode.id!r} has no parts; expected at least one")
    for k, part in enumerate(episode.parts):
        if part.task not in ROUTER_TASKS:
            raise ValueError(f"episode {episode.id!r}: part {k} has task = {part.task!r}, which is not a router task; "
                             f"expected one of {ROUTER_TASKS}")

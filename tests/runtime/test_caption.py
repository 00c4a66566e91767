"""`python -m balcap_jax.caption`: a folder captioned with a run's export, bad images skipped
by reason, and a killed run resumed without duplicates."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from balcap_jax import build
from balcap_jax.caption import caption, done_images, image_files
from balcap_jax.config import load_config_file
from balcap_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny():
    return load_config_file(os.path.join(ROOT, "configs/tiny.py"))


@pytest.fixture(scope="module")
def export_and_images(tmp_path_factory):
    """A tiny policy's export (weights + its BPE tokenizer) and a folder of 5 images, one
    corrupt file and one text file."""
    d = tmp_path_factory.mktemp("caption")
    trainer = build.build_trainer(_tiny(), make_mesh((1, 1, 1), jax.devices()[:1]))
    build.export(trainer, str(d / "export"))
    rng = np.random.default_rng(0)
    os.makedirs(d / "images" / "sub")
    for i in range(5):
        sub = "sub" if i == 4 else ""
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), np.uint8)).save(
            d / "images" / sub / f"img{i}.png")
    (d / "images" / "broken.png").write_bytes(b"not a png at all")
    (d / "images" / "notes.txt").write_text("ignored: not an image suffix")
    return d


def _cfg(export):
    c = _tiny()
    c.model.path, c.model.tokenizer = str(export), ""
    c.sampling.max_new_tokens = 8
    return c


def _lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def one_device(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(build, "mesh_and_rules", lambda cfg, sizes: (
        make_mesh((1, 1, 1), jax.devices()[:1]), None))


def test_a_folder_is_captioned_once_and_a_killed_run_resumes(export_and_images, tmp_path,
                                                              one_device):
    d = export_and_images
    paths = image_files(str(d / "images"))
    assert [os.path.basename(p) for p in paths] == [
        "broken.png", "img0.png", "img1.png", "img2.png", "img3.png", "img4.png"]
    out = str(tmp_path / "caps.jsonl")
    res = caption(_cfg(d / "export"), paths, out, batch=2)
    full = _lines(out)
    assert [r["image"] for r in full] == paths[1:]
    assert res["skipped"] == {"undecodable_image": 1} and res["kept"] == 5
    assert all(r["decoding"] == {"greedy": True, "max_new_tokens": 8} for r in full)
    assert json.load(open(out + ".summary.json"))["captioned_now"] == 5

    # killed mid-run: two whole lines and a torn third
    cut = str(tmp_path / "cut.jsonl")
    text = open(out).read().splitlines(keepends=True)
    open(cut, "w").write("".join(text[:2]) + text[2][:17])
    assert done_images(cut) == {full[0]["image"], full[1]["image"]}
    res = caption(_cfg(d / "export"), paths, cut, batch=2)
    again = _lines(cut)
    assert res["already_done"] == 2 and res["kept"] == 3
    assert [r["image"] for r in again] == [r["image"] for r in full]     # each image once
    assert [r["caption"] for r in again] == [r["caption"] for r in full]  # greedy: the same


def test_the_entry_point_names_what_is_missing(export_and_images):
    from balcap_jax.caption import inputs
    c = _cfg(export_and_images / "export")
    c.data.files = ""
    with pytest.raises(ValueError, match="--images=FOLDER"):
        inputs(c)
    c.model.path = ""
    with pytest.raises(ValueError, match="captioning needs model.path"):
        caption(c, [], "/nonexistent/out.jsonl", batch=2)
    c = _cfg(export_and_images / "export")          # 8 devices: batches of 8 rows at least
    c.train.batch_size = 8
    with pytest.raises(ValueError, match="--batch=2 must be a positive multiple of the 8"):
        caption(c, [], "/nonexistent/out.jsonl", batch=2)


def test_a_prepared_split_is_captioned_by_image_id(export_and_images, tmp_path, one_device,
                                                  monkeypatch):
    """--split: the data block's TFDS split (built as training builds it) captioned by image
    id, its pixels those of the files; the sampler gets the config's sampling.cache_windows."""
    from balcap_jax import sampling
    from balcap_jax.data.config import prepared_split
    windows, generate = [], sampling.generate

    def spy(*a, **kw):
        windows.append(kw.get("cache_windows"))
        return generate(*a, **kw)
    monkeypatch.setattr(sampling, "generate", spy)
    d = export_and_images
    ann = tmp_path / "ann.jsonl"
    with open(ann, "w") as f:
        for i in range(3):
            f.write(json.dumps({"image": f"img{i}.png", "image_id": f"id{i}",
                                "caption": f"reference {i}"}) + "\n")
    c = _cfg(d / "export")
    c.sampling.cache_windows = 2
    c.data.builder, c.data.files = "captions", str(ann)
    c.data.image_root, c.data.data_dir = str(d / "images"), str(tmp_path / "tfds")
    ids, example = prepared_split(c.data, "train")
    assert ids == ["id0", "id1", "id2"] and example("id1")["references"] == ["reference 1"]
    out = str(tmp_path / "split.jsonl")
    res = caption(c, ids, out, batch=2, load=lambda k: example(k)["image"])
    assert res["kept"] == 3 and [r["image"] for r in _lines(out)] == ids
    assert windows == [2, 2]                      # two batches of 2 (the second filled)
    for i in range(3):      # the split's images are the files' pixels (PNG kept exactly)
        np.testing.assert_array_equal(example(f"id{i}")["image"], np.asarray(
            Image.open(d / "images" / f"img{i}.png").convert("RGB")))

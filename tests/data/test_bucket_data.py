"""data.data_dir in a bucket: gs:// served from memory through fsspec (tests/_fakes/bucket.py),
the same etils.epath code a real bucket uses. The builder host prepares the dataset in a local
copy and copies it up (dataset_info.json last); another host, or a later run on a fresh machine,
copies it down and reads it without building; the examples equal a local data_dir's."""
import os

import numpy as np

from balcap_jax.data import builders
from balcap_jax.data import config as data_config
from tests._fakes.bucket import memory_bucket
from tests.data import fakes

URL = "gs://b/tfds"


def _examples(builder) -> dict:
    src = builders.open_source(builder, "train")
    return {bytes(src[i]["image_id"]): src[i] for i in range(len(src))}


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == fakes.N_GOOD + len(fakes.CONVERTED) + 1
    for k in a:
        np.testing.assert_array_equal(a[k]["image"], b[k]["image"])
        assert list(a[k]["references"]) == list(b[k]["references"])


def test_a_dataset_in_a_bucket_is_built_once_and_read_by_every_host(monkeypatch, tmp_path):
    bucket = memory_bucket(monkeypatch, str(tmp_path / "host0"))
    root = str(tmp_path / "corpus")
    path = fakes.write_sharegpt4v(root, fakes.make_images(root))
    kw = dict(image_root=os.path.join(root, "img"), max_side=fakes.MAX_SIDE,
              max_pixels=fakes.MAX_PIXELS, num_workers=2)
    local, _ = builders.build_dataset("sharegpt4v", path, data_dir=str(tmp_path / "local"), **kw)
    built, summary = builders.build_dataset("sharegpt4v", path, data_dir=URL, **kw)
    assert summary["train"]["kept"] == len(_examples(local))
    # the bucket holds the dataset's directory, its marker written after every other file
    rel = os.path.relpath(built.data_dir, os.path.dirname(os.path.dirname(os.path.dirname(
        built.data_dir))))
    keys = [k for k in bucket.store if k.startswith(f"{URL}/{rel}/")]
    names = [k.rsplit("/", 1)[1] for k in keys]
    assert names[-1] == builders.INFO_FILE and builders.SUMMARY_FILE in names
    assert any(".array_record" in n for n in names), names
    assert not built.data_dir.startswith("gs://")      # read from the local copy
    _equal(_examples(built), _examples(local))

    # another host (a fresh machine): copies the prepared dataset down, never builds
    monkeypatch.setattr("balcap_jax.workdir.MIRROR_ROOT", str(tmp_path / "host1"))

    def no_build(*a, **k):
        raise AssertionError("a dataset prepared in the bucket was built again")
    monkeypatch.setattr(builders.BUILDERS["sharegpt4v"], "download_and_prepare", no_build)
    cfg = data_config.with_defaults(None)
    cfg.builder, cfg.files, cfg.data_dir = "sharegpt4v", path, URL
    cfg.image_root, cfg.max_side, cfg.max_pixels = kw["image_root"], fakes.MAX_SIDE, \
        fakes.MAX_PIXELS
    reader = data_config._build(cfg, is_builder_host=False)
    assert reader.is_prepared() and reader.data_dir.startswith(str(tmp_path / "host1"))
    _equal(_examples(reader), _examples(local))
    # ... and the builder host's next run reuses its own copy with the summary
    again, summary2 = builders.build_dataset("sharegpt4v", path, data_dir=URL, **kw)
    assert again.data_dir == reader.data_dir and summary2["train"] == summary["train"]


def test_shapes_world_in_a_bucket(monkeypatch, tmp_path):
    from balcap_jax.shapes.dataset import build_shapes_dataset, open_shapes_source
    bucket = memory_bucket(monkeypatch, str(tmp_path / "host0"))
    a = build_shapes_dataset(num_train=3, num_eval=2, image_size=48, data_dir=URL)
    assert any(k.endswith(builders.INFO_FILE) for k in bucket.store)
    monkeypatch.setattr("balcap_jax.workdir.MIRROR_ROOT", str(tmp_path / "host1"))
    b = build_shapes_dataset(num_train=3, num_eval=2, image_size=48, data_dir=URL)
    assert b.data_dir != a.data_dir
    sa, sb = open_shapes_source(a, "eval"), open_shapes_source(b, "eval")
    assert len(sa) == len(sb) == 2
    for i in range(2):
        np.testing.assert_array_equal(sa[i]["image"], sb[i]["image"])


def test_a_local_data_dir_is_absolute_and_a_url_is_kept():
    assert builders.resolve_data_dir(URL) == URL
    assert builders.resolve_data_dir("rel/dir") == os.path.abspath("rel/dir")

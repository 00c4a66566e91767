"""CaptionLoader: seeded order, host shards, exact resume; make_loader on a built dataset."""
import json
import os

import numpy as np
import pytest

from balcap_jax.data import config as data_config
from balcap_jax.data.loader import CaptionLoader
from tests.data import fakes


def _source(n):
    # What tfds.data_source returns: text as bytes, image as uint8 array.
    return [{"image": np.full((2, 3, 3), i % 256, np.uint8), "image_id": f"id{i:03d}".encode(),
             "references": [f"ref {i}".encode()], "prompt": f"own prompt {i}".encode()}
            for i in range(n)]


def _ids(loader, n_batches):
    return [ex["image_id"] for _ in range(n_batches) for ex in next(loader)]


def _loader(src, **kw):
    kw = {"batch_size": 4, "seed": 0, "shard_index": 0, "shard_count": 1, **kw}
    return CaptionLoader(src, **kw)


def test_seeded_order_and_epochs():
    src = _source(10)
    a = _ids(_loader(src, seed=3), 5)   # 20 examples = 2 epochs
    assert a == _ids(_loader(src, seed=3), 5)
    assert a != _ids(_loader(src, seed=4), 5)
    all_ids = {f"id{i:03d}" for i in range(10)}
    assert set(a[:10]) == all_ids and set(a[10:]) == all_ids  # each epoch a permutation
    assert a[:10] != a[10:]                                    # reshuffled per epoch
    assert a[:10] != sorted(a[:10])


def test_batches_hold_the_example_fields():
    batch = next(_loader(_source(5), batch_size=3))
    assert len(batch) == 3
    ex = batch[0]
    assert set(ex) == {"image", "image_id", "references", "prompt"}
    i = int(ex["image_id"][2:])
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (2, 3, 3)
    assert ex["image"][0, 0, 0] == i and ex["references"] == [f"ref {i}"]
    assert ex["prompt"] == data_config.CAPTION_PROMPT


def test_two_hosts_disjoint_and_covering():
    src = _source(25)
    h0 = _loader(src, shard_index=0, shard_count=2, batch_size=1)
    h1 = _loader(src, shard_index=1, shard_count=2, batch_size=1)
    assert (h0.examples_per_epoch, h1.examples_per_epoch) == (13, 12)
    e0, e1 = _ids(h0, 13), _ids(h1, 12)
    assert not set(e0) & set(e1)
    assert set(e0) | set(e1) == {f"id{i:03d}" for i in range(25)}
    assert len(set(e0)) == 13 and len(set(e1)) == 12


def test_resume_mid_epoch_yields_exactly_the_rest():
    src = _source(23)
    a = _loader(src, batch_size=4, seed=7)
    seen = _ids(a, 3)
    state = json.loads(json.dumps(a.get_state()))
    assert (state["epoch"], state["index"], state["seed"]) == (0, 12, 7)
    rest = _ids(a, 6)  # crosses into epoch 1
    b = _loader(src, batch_size=4, seed=123)  # the state's seed wins
    next(b)  # already used with its own seed: its cached order must not leak into the restore
    b.set_state(state)
    assert _ids(b, 6) == rest
    # The remaining examples of epoch 0 are exactly those not yet seen.
    assert sorted(seen + rest[:11]) == [f"id{i:03d}" for i in range(23)]
    assert b.get_state() == a.get_state()


def test_iterator_replaced_by_set_state_keeps_its_own_order():
    """After set_state, the replaced iterator's prefetch threads may still be reading (a CI
    run under load once saw them put the old seed's epoch-1 order into the restored stream).
    Each iterator binds its seed: draining the old one after the restore yields the old seed's
    order, and the restored stream is unaffected."""
    src = _source(23)
    a = _loader(src, batch_size=4, seed=7)
    _ids(a, 3)
    state = a.get_state()
    rest = _ids(a, 6)
    c = _loader(src, batch_size=4, seed=123)
    own = _ids(c, 8)                               # seed 123's first 8 batches
    b = _loader(src, batch_size=4, seed=123, read_threads=1, prefetch=1)  # little read ahead
    first = [ex["image_id"] for ex in next(b)]
    old = b._iter
    b.set_state(state)
    later = [ex["image_id"] for _ in range(7) for ex in next(old)]  # epochs 0-1, seed 123
    assert first + later == own
    assert _ids(b, 6) == rest


def test_any_hosts_state_restores_every_host():
    # 25 examples on 2 hosts: epochs of 13 and 12. After the same number of steps, host 0's
    # saved state must put host 1 exactly where host 1 itself would be.
    src = _source(25)
    h0 = _loader(src, shard_index=0, shard_count=2, batch_size=5)
    h1 = _loader(src, shard_index=1, shard_count=2, batch_size=5)
    _ids(h0, 3), _ids(h1, 3)
    s0, s1 = h0.get_state(), h1.get_state()
    assert (s0["epoch"], s0["index"], s1["epoch"], s1["index"]) == (1, 2, 1, 3)
    want = _ids(h1, 4)
    fresh = _loader(src, shard_index=1, shard_count=2, batch_size=5)
    fresh.set_state(s0)
    assert _ids(fresh, 4) == want


def test_resume_per_host_and_bad_state():
    src = _source(30)
    a = _loader(src, shard_index=1, shard_count=3, batch_size=2)
    _ids(a, 4)
    state = a.get_state()
    want = _ids(a, 3)
    b = _loader(src, shard_index=1, shard_count=3, batch_size=2)
    b.set_state(state)
    assert _ids(b, 3) == want
    with pytest.raises(ValueError, match="outside the saving host's epoch of 10"):
        b.set_state({**state, "index": 10})
    with pytest.raises(ValueError, match="lacks"):
        b.set_state({"epoch": 0})


def test_prompts_per_example_are_deterministic():
    src = _source(40)
    prompts = ("p0", "p1", "p2")
    la, lb = _loader(src, prompts=prompts), _loader(src, prompts=prompts)
    a = [(e["image_id"], e["prompt"]) for _ in range(10) for e in next(la)]
    b = [(e["image_id"], e["prompt"]) for _ in range(10) for e in next(lb)]
    assert a == b and len({i for i, _ in a}) == 40
    assert {p for _, p in a} == set(prompts)
    own = next(_loader(src, use_data_prompt=True))
    assert all(e["prompt"] == f"own prompt {int(e['image_id'][2:])}" for e in own)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shard_index=2"):
        _loader(_source(4), shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="fewer than shard_count=8"):
        _loader(_source(4), shard_count=8)
    with pytest.raises(ValueError, match="batch_size=0"):
        _loader(_source(4), batch_size=0)


def test_make_loader_from_config(tmp_path):
    root = str(tmp_path)
    images = fakes.make_images(root)
    cfg = data_config.default_data_config()
    cfg.builder = "captions"
    cfg.files = fakes.write_csv(root, images)
    cfg.image_root = os.path.join(root, "img")
    cfg.data_dir = os.path.join(root, "tfds")
    cfg.max_side, cfg.max_pixels = fakes.MAX_SIDE, fakes.MAX_PIXELS
    loader = data_config.make_loader(cfg, batch_size=5, seed=1)
    assert (loader.shard_index, loader.shard_count) == (0, 1)  # from jax.process_*()
    assert loader.num_examples == fakes.N_GOOD + len(fakes.CONVERTED) + 1
    ids = []
    for _ in range(6):  # 30 > 26: the stream continues into the next epoch
        batch = next(loader)
        assert len(batch) == 5
        for ex in batch:
            assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
            assert ex["image"].shape[2] == 3 and max(ex["image"].shape[:2]) <= fakes.MAX_SIDE
            assert ex["references"] and all(isinstance(r, str) for r in ex["references"])
            assert ex["prompt"] == data_config.CAPTION_PROMPT
            ids.append(ex["image_id"])
    assert set(ids[:26]) == set(fakes.usable(images))
    state = loader.get_state()
    again = data_config.make_loader(cfg, batch_size=5, seed=1, shard_index=0, shard_count=1)
    again.set_state(state)
    assert [e["image_id"] for e in next(again)] == [e["image_id"] for e in next(loader)]


def test_partial_config_and_eval_examples(tmp_path):
    import ml_collections
    root = str(tmp_path)
    images = fakes.make_images(root)
    # A trainer's data section with only some keys: the rest come from default_data_config().
    d = ml_collections.ConfigDict({"source": "tfds", "prompt": "Caption it.", "num_eval": 4})
    with pytest.raises(ValueError, match="data.files is empty"):
        data_config.make_loader(d, batch_size=2, seed=0)
    d.builder = "coco"
    d.files = fakes.write_coco(root, images)
    d.eval_files = d.files
    d.image_root = os.path.join(root, "img")
    d.data_dir = os.path.join(root, "tfds")
    d.max_side, d.max_pixels = fakes.MAX_SIDE, fakes.MAX_PIXELS
    batch = next(data_config.make_loader(d, batch_size=2, seed=0))
    assert [e["prompt"] for e in batch] == ["Caption it."] * 2
    evals = data_config.eval_examples(d)
    assert [e["image_id"] for e in evals] == ["1000", "1001", "1002", "1003"]
    assert evals[0]["references"][0] == fakes.caption(images["good"][0])
    assert [e["image_id"] for e in data_config.eval_examples(d)] == ["1000", "1001", "1002",
                                                                      "1003"]
    d.eval_files = ""
    assert data_config.eval_examples(d) == []

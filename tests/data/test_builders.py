"""Each TFDS builder on generated files with every kind of bad record: exact counts per reason,
the decoded examples, reuse of a prepared dataset, and clear errors for unusable files."""
import json
import os

import numpy as np
import pytest

from balcap_jax.data import builders
from tests.data import fakes

IMAGE_SKIPS = {"missing_image": 1, "empty_image": 1, "truncated_image": 1,
               "undecodable_image": 1, "too_many_pixels": 1}
IMAGE_FIXES = {"converted_L": 1, "converted_RGBA": 1, "converted_P": 1, "converted_CMYK": 1,
               "converted_I;16": 1, "resized": 1}
KEPT = fakes.N_GOOD + len(fakes.CONVERTED) + 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    return root, fakes.make_images(root)


def _build(fmt, path, root, data_dir, **kw):
    return builders.build_dataset(fmt, path, image_root=os.path.join(root, "img"),
                                  data_dir=data_dir, max_side=fakes.MAX_SIDE,
                                  max_pixels=fakes.MAX_PIXELS, num_workers=2, **kw)


def _examples(builder):
    src = builders.open_source(builder, "train")
    out = {}
    for i in range(len(src)):
        ex = src[i]
        out[ex["image_id"].decode() if isinstance(ex["image_id"], bytes) else ex["image_id"]] = ex
    return out


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


def _check_images(examples, id_of):
    for i in range(fakes.N_GOOD):
        name = f"good{i:02d}." + ("jpg" if i % 2 else "png")
        img = examples[id_of(name)]["image"]
        assert img.dtype == np.uint8 and img.shape == (12 + i % 7, 16 + i % 11, 3)
        # PNGs are kept byte-exact; JPEG of a flat colour is within a few levels.
        tol = 4 if i % 2 else 0
        assert np.abs(img.astype(int) - np.array(fakes.good_color(i))).max() <= tol, name
    huge = examples[id_of("huge.png")]["image"]
    assert huge.shape == (26, 64, 3)  # 200x80 -> longer side 64, aspect kept


def test_sharegpt4v_jsonl_counts_and_examples(corpus, tmp_path):
    root, images = corpus
    path = fakes.write_sharegpt4v(root, images)
    builder, summary = _build("sharegpt4v", path, root, str(tmp_path))
    s = summary["train"]
    assert s["kept"] == KEPT
    assert s["skipped"] == {**IMAGE_SKIPS, "duplicate_id": 1, "empty_reference": 1,
                            "missing_reference": 1, "missing_image_field": 1,
                            "malformed_line": 1}
    assert s["fixed"] == {**IMAGE_FIXES, "merged_duplicate_id": 1}
    assert s["examples"]["malformed_line"][0].startswith("sharegpt4v.jsonl:5:")
    assert "missing.jpg" in s["examples"]["missing_image"][0]
    # The summary is also written beside the dataset.
    with open(os.path.join(builder.data_dir, builders.SUMMARY_FILE)) as f:
        assert json.load(f) == summary

    ex = _examples(builder)
    assert len(ex) == KEPT
    first = ex[f"sg_{images['good'][0]}"]
    assert [_text(r) for r in first["references"]] == [
        fakes.caption(images["good"][0]), "second caption"]
    assert _text(first["prompt"]) == "What is this?"
    _check_images(ex, lambda n: f"sg_{n}")


def test_sharegpt4v_json_list_and_reuse(corpus, tmp_path):
    root, images = corpus
    path = fakes.write_sharegpt4v(root, images, jsonl=False)
    builder, summary = _build("sharegpt4v", path, root, str(tmp_path))
    assert summary["train"]["kept"] == KEPT
    assert "malformed_line" not in summary["train"]["skipped"]
    data_files = [os.path.join(builder.data_dir, f) for f in os.listdir(builder.data_dir)
                  if "array_record" in f]
    mtimes = [os.stat(f).st_mtime_ns for f in data_files]
    builder2, summary2 = _build("sharegpt4v", path, root, str(tmp_path))
    assert builder2.data_dir == builder.data_dir and summary2 == summary
    assert [os.stat(f).st_mtime_ns for f in data_files] == mtimes  # reused, not rebuilt
    # Changed settings get their own dataset instead of a stale one.
    builder3, _ = builders.build_dataset(
        "sharegpt4v", path, image_root=os.path.join(root, "img"), data_dir=str(tmp_path),
        max_side=32, max_pixels=fakes.MAX_PIXELS, num_workers=1)
    assert builder3.data_dir != builder.data_dir
    assert _examples(builder3)[f"sg_{images['good'][0]}"]["image"].shape[1] <= 32


def test_coco_counts_and_references(corpus, tmp_path):
    root, images = corpus
    path = fakes.write_coco(root, images)
    builder, summary = _build("coco", path, root, str(tmp_path))
    s = summary["train"]
    assert s["kept"] == KEPT
    assert s["skipped"] == {**IMAGE_SKIPS, "duplicate_id": 1, "missing_reference": 1,
                            "empty_reference": 1, "orphan_annotation": 1}
    assert s["fixed"] == {**IMAGE_FIXES, "dropped_empty_reference": 1}
    ex = _examples(builder)
    assert len(ex) == KEPT
    assert [_text(r) for r in ex["1000"]["references"]] == [
        fakes.caption(images["good"][0]), "another caption of the first image"]
    assert [_text(r) for r in ex["1001"]["references"]] == [fakes.caption(images["good"][1])]
    names = fakes.usable(images)
    _check_images(ex, lambda n: str(1000 + names.index(n)))


def test_csv_counts(corpus, tmp_path):
    root, images = corpus
    path = fakes.write_csv(root, images)
    builder, summary = _build("captions", path, root, str(tmp_path))
    s = summary["train"]
    assert s["kept"] == KEPT
    assert s["skipped"] == {**IMAGE_SKIPS, "empty_reference": 1, "missing_image_field": 1,
                            "duplicate_id": 1}
    assert s["fixed"] == {**IMAGE_FIXES, "merged_duplicate_id": 1}
    ex = _examples(builder)
    g0 = images["good"][0]
    assert [_text(r) for r in ex[g0]["references"]] == [fakes.caption(g0), "a second caption"]
    _check_images(ex, lambda n: n)


def test_captions_jsonl_with_malformed_lines(corpus, tmp_path):
    root, images = corpus
    path = os.path.join(root, "plain.jsonl")
    g = images["good"]
    with open(path, "w") as f:
        f.write(json.dumps({"image": g[0], "caption": "one"}) + "\n")
        f.write("not json\n")
        f.write(json.dumps({"image": g[1], "captions": ["two", "", "three"]}) + "\n")
        f.write("\n")
        f.write('{"image": "x.png", "caption": \n')
        f.write(json.dumps({"image": g[2]}) + "\n")
        f.write(json.dumps(["a list"]) + "\n")
    builder, summary = _build("captions", path, root, str(tmp_path))
    s = summary["train"]
    assert (s["kept"], s["skipped"], s["fixed"]) == (
        2, {"malformed_line": 2, "missing_reference": 1, "malformed_record": 1},
        {"dropped_empty_reference": 1})
    assert [e.split(":")[:2] for e in s["examples"]["malformed_line"]] == [
        ["plain.jsonl", "2"], ["plain.jsonl", "5"]]
    assert [_text(r) for r in _examples(builder)[g[1]]["references"]] == ["two", "three"]


def test_malformed_json_file_raises_with_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"image": "a.png", "conversations": []},\n {"image": oops}]')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 2, column 12"):
        builders.build_dataset("sharegpt4v", str(path), data_dir=str(tmp_path / "d"))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        builders.build_dataset("coco", str(tmp_path / "nothere.json"), data_dir=str(tmp_path))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown caption format 'flickr'"):
        builders.build_dataset("flickr", str(tmp_path / "x.json"), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'images' and 'annotations'"):
        builders.build_dataset("coco", str(tmp_path / "x.json"), data_dir=str(tmp_path))


def test_no_usable_example_is_an_error(corpus, tmp_path):
    root, images = corpus
    path = fakes.write_coco(root, images)
    for _ in range(2):  # nothing is written, so the second call tries again and refuses again
        with pytest.raises(ValueError, match=r"no usable examples in split 'train': skipped "
                           r".*'missing_image': 31"):
            builders.build_dataset("coco", path, image_root=str(tmp_path / "wrong"),
                                   data_dir=str(tmp_path), max_side=fakes.MAX_SIDE,
                                   max_pixels=fakes.MAX_PIXELS)

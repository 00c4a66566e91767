"""Image reading that shares no state and cannot hang, and inputs that cannot escape the image
root: header bombs on several threads, a named pipe, ../ and absolute paths, a NUL byte,
over-long references, and a rebuild after an image is added."""
import json
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from balcap_jax.data import builders, images


def _png_header_bomb(path: str, side: int = 20000) -> None:
    """A PNG whose header claims side x side pixels (400M: over max_pixels) and holds none."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _write(root, rows, name="captions.jsonl"):
    path = os.path.join(root, name)
    with open(path, "w") as f:
        for image, caption in rows:
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")
    return path


def _good(path, color=(10, 200, 30)):
    Image.fromarray(np.full((20, 24, 3), color, np.uint8)).save(path)


def _ids(builder):
    src = builders.open_source(builder, "train")
    return sorted(src[i]["image_id"].decode() for i in range(len(src)))


def test_header_bombs_on_threads_touch_no_global_state(tmp_path):
    """40 header bombs among 40 good images, decoded on 8 threads: every bomb is
    too_many_pixels (never undecodable), and PIL's process-wide limit is never changed."""
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(40):
        _png_header_bomb(str(img / f"bomb{i}.png"))
        _good(str(img / f"good{i}.png"))
        rows += [(f"bomb{i}.png", "a bomb"), (f"good{i}.png", "a good one")]
    path = _write(str(tmp_path), rows)
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)
    before = Image.MAX_IMAGE_PIXELS
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, summary = builders.build_dataset("captions", path, image_root=str(img),
                                            data_dir=str(tmp_path / "tfds"), num_workers=8)
    finally:
        stop.set()
        watcher.join()
    s = summary["train"]
    assert s["kept"] == 40 and s["skipped"] == {"too_many_pixels": 40}, s
    assert seen == {before} and Image.MAX_IMAGE_PIXELS == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_is_skipped_not_waited_on(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    os.mkfifo(img / "pipe.png")
    _good(str(img / "ok.png"))
    path = _write(str(tmp_path), [("pipe.png", "a pipe"), ("ok.png", "fine")])
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=builders.build_dataset(
        "captions", path, image_root=str(img), data_dir=str(tmp_path / "tfds"))), daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():              # unblock the reader so the test process can finish
        fd = os.open(img / "pipe.png", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("the build blocked on a named pipe")
    builder, summary = out["r"]
    assert summary["train"]["skipped"] == {"not_a_regular_file": 1}
    assert _ids(builder) == ["ok.png"]
    # and the file size cap
    with pytest.raises(images.BadImage, match="max_image_bytes") as e:
        images.load_image(str(img / "ok.png"), max_bytes=16)
    assert e.value.reason == "file_too_large"


def test_paths_outside_the_image_root_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    _good(str(root / "img" / "inside.png"))
    _good(str(root / "outside.png"))
    _good(str(tmp_path / "elsewhere.png"))
    rows = [("inside.png", "in"), ("../outside.png", "up"), (str(tmp_path / "elsewhere.png"),
                                                              "absolute"),
            ("in\0side.png", "nul")]
    path = _write(str(root), rows)
    kw = dict(image_root=str(root / "img"), num_workers=1)
    builder, summary = builders.build_dataset("captions", path, data_dir=str(tmp_path / "a"),
                                              **kw)
    s = summary["train"]
    assert s["skipped"] == {"image_outside_root": 2, "bad_image_path": 1}, s
    assert s["kept"] == 1
    assert "allow_outside_root" in " ".join(s["examples"]["image_outside_root"])
    builder, summary = builders.build_dataset("captions", path, data_dir=str(tmp_path / "b"),
                                              allow_outside_root=True, **kw)
    assert summary["train"]["skipped"] == {"bad_image_path": 1}
    assert summary["train"]["kept"] == 3
    # load_image itself names a NUL byte as a bad path, not an undecodable image
    with pytest.raises(images.BadImage) as e:
        images.load_image(str(root / "img" / "in\0side.png"))
    assert e.value.reason == "bad_image_path"


def test_long_references_are_cut_counted_and_reported(tmp_path):
    (tmp_path / "img").mkdir()
    _good(str(tmp_path / "img" / "a.png"))
    _good(str(tmp_path / "img" / "b.png"))
    long = " ".join(f"Sentence number {i} is here." for i in range(400))     # ~11k chars
    path = _write(str(tmp_path), [("a.png", long), ("b.png", "short.")])
    builder, summary = builders.build_dataset("captions", path, image_root=str(tmp_path / "img"),
                                              data_dir=str(tmp_path / "tfds"),
                                              max_caption_chars=1000)
    s = summary["train"]
    assert s["fixed"] == {"cut_long_reference": 1} and s["kept"] == 2
    assert "a.png" in s["examples"]["cut_long_reference"][0] or \
        "characters" in s["examples"]["cut_long_reference"][0]
    src = builders.open_source(builder, "train")
    refs = {src[i]["image_id"].decode(): [r.decode() for r in src[i]["references"]]
            for i in range(len(src))}
    cut = refs["a.png"][0]
    assert 500 <= len(cut) <= 1000 and cut.endswith(".") and long.startswith(cut)
    assert refs["b.png"] == ["short."]
    with open(os.path.join(builder.data_dir, builders.SUMMARY_FILE)) as f:
        assert json.load(f)["train"]["fixed"] == {"cut_long_reference": 1}


def test_adding_a_missing_image_builds_a_new_dataset(tmp_path):
    """The dataset is keyed on the images the records name: adding the missing one (or
    replacing one) and building again gives a dataset that holds it."""
    img = tmp_path / "img"
    img.mkdir()
    _good(str(img / "a.png"))
    path = _write(str(tmp_path), [("a.png", "first"), ("b.png", "second")])
    kw = dict(image_root=str(img), data_dir=str(tmp_path / "tfds"))
    first, s1 = builders.build_dataset("captions", path, **kw)
    assert _ids(first) == ["a.png"] and s1["train"]["skipped"] == {"missing_image": 1}
    again, _ = builders.build_dataset("captions", path, **kw)
    assert again.data_dir == first.data_dir            # nothing changed: reused
    _good(str(img / "b.png"))
    second, s2 = builders.build_dataset("captions", path, **kw)
    assert second.data_dir != first.data_dir
    assert _ids(second) == ["a.png", "b.png"] and s2["train"]["skipped"] == {}
    time.sleep(0.01)
    _good(str(img / "b.png"), color=(1, 2, 3))        # replaced in place
    third, _ = builders.build_dataset("captions", path, **kw)
    assert third.data_dir not in (first.data_dir, second.data_dir)
    with open(os.path.join(third.data_dir, builders.SUMMARY_FILE)) as f:
        assert "images they name" in json.load(f)["_reuse"]

"""TFDS builders (array_record, no TensorFlow) for caption datasets made from local files.

One builder class per input format (see records.py): `sharegpt4v_captions`, `coco_caption_files`,
`caption_files`. They are configured at run time with a `CaptionFilesConfig` (files per split,
image root, image limits), whose name is a hash of those settings, of the annotation files'
sizes and modification times, and of the name, size and modification time of every image the
records name (or that it is missing): the same inputs reuse the prepared dataset; an edited
annotation file, an image added, replaced or removed get a new directory instead of a stale one.
An explicit `name` (data.name) skips the image scan and is reused as long as it exists.

Each example: `image` (RGB, longer side <= max_side), `image_id`, `references` (list of str),
`prompt` (the record's own instruction or ""), `source` (file:line, for tracing a bad caption).

`build_dataset` prepares (or reuses) a dataset and returns its build summary: counts per reason
of skipped records and applied fixes, with the first offenders; the summary is logged and
written as `build_summary.json` beside the dataset's files.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath

from balcap_jax import workdir
from balcap_jax.data import images as images_lib
from balcap_jax.data import records as records_lib

log = logging.getLogger(__name__)

SUMMARY_FILE = "build_summary.json"
INFO_FILE = "dataset_info.json"     # TFDS writes it last: its presence means prepared
DEFAULT_DATA_DIR = os.path.join("workdir", "tfds")


@dataclasses.dataclass(eq=False)
class CaptionFilesConfig(tfds.core.BuilderConfig):
    """Run-time inputs of a caption builder. `splits`: ((split, (file, ...)), ...)."""
    splits: tuple[tuple[str, tuple[str, ...]], ...] = ()
    image_root: str = ""
    max_side: int = images_lib.DEFAULT_MAX_SIDE
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS
    max_image_bytes: int = images_lib.DEFAULT_MAX_BYTES
    max_caption_chars: int = records_lib.DEFAULT_MAX_CAPTION_CHARS
    allow_outside_root: bool = False
    num_workers: int = 4  # threads decoding/resizing images while building


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """fn over items in threads, results in input order, at most ~4*workers in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        pending: collections.deque = collections.deque()
        for x in items:
            pending.append(ex.submit(fn, x))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder defined outside a TFDS package (ours: caption files and ShapesWorld)."""

    # TFDS 4.9's default code_path touches `importlib_resources`, a backport it only installs for
    # Python < 3.9, when the builder lives in a package; the plain file path is all it needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


def caption_features(image_shape: tuple, **extra: Any) -> tfds.features.FeaturesDict:
    """An example of a caption dataset: image, image_id, references, prompt, plus `extra`."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=image_shape),
        "image_id": tfds.features.Text(),
        "references": tfds.features.Sequence(tfds.features.Text()),
        "prompt": tfds.features.Text(), **extra})


class _CaptionBuilder(LocalBuilder, skip_registration=True):
    """Shared body; subclasses set FORMAT (a records.READERS key)."""

    FORMAT = ""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "image, image_id, references, prompt, source"}
    BUILDER_CONFIG_CLASS = CaptionFilesConfig

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.summaries: dict[str, records_lib.Summary] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self, ...) because dataset_info_from_configs needs a TFDS package dir.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Image captions read from local {self.FORMAT} files.",
            features=caption_features((None, None, 3), source=tfds.features.Text()))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if not cfg.splits:
            raise ValueError(f"{self.name}: no files configured; pass a CaptionFilesConfig with "
                             "splits=(('train', (file, ...)),)")
        return {split: self._generate_examples(split, files) for split, files in cfg.splits}

    def _load(self, record: records_lib.Record):
        cfg = self.builder_config
        try:
            return images_lib.load_image(record.image, max_side=cfg.max_side,
                                         max_pixels=cfg.max_pixels, max_bytes=cfg.max_image_bytes)
        except images_lib.BadImage as e:
            return e
        except Exception as e:  # noqa: BLE001 - an unforeseen PIL failure must not stop a build
            return images_lib.BadImage(images_lib.UNDECODABLE,
                                       f"{record.image}: {type(e).__name__}: {e}")

    def _generate_examples(self, split: str, files: Iterable[str]):
        cfg = self.builder_config
        summary = records_lib.Summary()
        self.summaries[split] = summary
        records = records_lib.read_records(self.FORMAT, files, cfg.image_root or None, summary,
                                           **_record_options(cfg))
        for record, loaded in zip(records, _ordered_map(self._load, records, cfg.num_workers)):
            if isinstance(loaded, images_lib.BadImage):
                summary.skip(loaded.reason, f"{record.where}: {loaded.detail}")
                continue
            for fix in loaded.fixes:
                summary.fix(fix, f"{record.where} {record.image}")
            summary.kept += 1
            yield record.image_id, {"image": loaded.data, "image_id": record.image_id,
                                    "references": record.references, "prompt": record.prompt,
                                    "source": record.where}
        summary.log(f"{self.name}/{cfg.name} split {split!r}")


class Sharegpt4vCaptions(_CaptionBuilder):
    """ShareGPT4V-style JSON/JSONL: `image` + `conversations`; the model turn is the caption."""
    FORMAT = "sharegpt4v"


class CocoCaptionFiles(_CaptionBuilder):
    """COCO captions JSON: `images` + `annotations`; every caption of an image is a reference."""
    FORMAT = "coco"


class CaptionFiles(_CaptionBuilder):
    """Plain `image,caption` CSV, or JSONL/JSON records with image + caption(s)."""
    FORMAT = "captions"


BUILDERS: dict[str, type[_CaptionBuilder]] = {
    b.FORMAT: b for b in (Sharegpt4vCaptions, CocoCaptionFiles, CaptionFiles)}


def _split_files(files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
                 split: str) -> dict[str, list[str]]:
    def as_list(f):
        if isinstance(f, str):
            return [p.strip() for p in f.split(",") if p.strip()]
        return [str(p) for p in f]
    if isinstance(files, Mapping):
        out = {s: as_list(f) for s, f in files.items()}
    else:
        out = {split: as_list(files)}
    for s, fs in out.items():
        if not fs:
            raise ValueError(f"split {s!r}: no annotation files given (data.files is empty)")
        for f in fs:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"split {s!r}: annotation file {f!r} does not exist")
    return out


def _record_options(cfg) -> dict:
    return dict(allow_outside=cfg.allow_outside_root, max_caption_chars=cfg.max_caption_chars)


def _image_fingerprint(fmt: str, splits, root: str, options: dict, workers: int) -> bytes:
    """Name, size and mtime of every image the records name ("-" when missing), in record
    order: adding a missing image, or replacing one, changes the dataset's name."""
    paths = []
    for _, fs in splits:
        records = records_lib.read_records(fmt, fs, root or None, records_lib.Summary(),
                                           **options)
        paths += [r.image for r in records]

    def one(path: str) -> str:
        try:
            st = os.stat(path)
            return f"{path}\0{st.st_size}:{st.st_mtime_ns}"
        except (OSError, ValueError):
            return f"{path}\0-"
    h = hashlib.sha1()
    for line in _ordered_map(one, paths, max(workers, 16)):
        h.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return h.digest()


def resolve_data_dir(data_dir: str | None) -> str:
    """The given data dir (a bucket URL as it is), or `workdir/tfds` under the current
    directory."""
    if data_dir and workdir.is_remote(data_dir):
        return data_dir
    return os.path.abspath(os.path.expanduser(data_dir or DEFAULT_DATA_DIR))


def open_builder(cls, config, data_dir: str | None):
    """`cls(config)` on `data_dir`, ready to read when the dataset is prepared there.

    A bucket `data_dir` (gs://...) is read from a local copy (a `workdir.Mirror`), because
    array_record reads local files: when the bucket holds the prepared dataset (an earlier
    run's, or another host's build) and the copy does not, the dataset's own directory is
    copied down. A dataset built into the copy goes up with `publish`. The copy needs the
    dataset's size on local disk."""
    data_dir = resolve_data_dir(data_dir)
    if not workdir.is_remote(data_dir):
        return cls(config=config, data_dir=data_dir, file_format="array_record")
    local = workdir.Mirror(data_dir).local
    builder = cls(config=config, data_dir=local, file_format="array_record")
    remote = workdir.join(data_dir, os.path.relpath(builder.data_dir, local))
    if not builder.is_prepared() and workdir.exists(workdir.join(remote, INFO_FILE)):
        log.info("copying prepared dataset %s down to %s", remote, builder.data_dir)
        workdir.download_dir(remote, builder.data_dir)
        builder = cls(config=config, data_dir=local, file_format="array_record")
    return builder


def publish(builder, data_dir: str | None) -> None:
    """Copies a dataset just built for a bucket `data_dir` up to it, dataset_info.json last,
    so that no reader takes a half-copied dataset for a prepared one (local: nothing to do)."""
    data_dir = resolve_data_dir(data_dir)
    if workdir.is_remote(data_dir):
        local = workdir.Mirror(data_dir).local
        remote = workdir.join(data_dir, os.path.relpath(builder.data_dir, local))
        workdir.upload_dir(builder.data_dir, remote, last=INFO_FILE)
        log.info("prepared dataset copied up to %s", remote)


def make_config(fmt: str, files, *, split: str = "train", image_root: str | None = None,
                max_side: int = images_lib.DEFAULT_MAX_SIDE,
                max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
                max_image_bytes: int = images_lib.DEFAULT_MAX_BYTES,
                max_caption_chars: int = records_lib.DEFAULT_MAX_CAPTION_CHARS,
                allow_outside_root: bool = False, num_workers: int = 4,
                name: str | None = None) -> CaptionFilesConfig:
    """A config whose default name hashes every input that changes the built dataset: the
    settings, the annotation files and the images they name (module docstring)."""
    if fmt not in BUILDERS:
        raise ValueError(f"unknown caption format {fmt!r}; use one of {sorted(BUILDERS)}")
    per_split = _split_files(files, split)
    splits = tuple((s, tuple(os.path.abspath(f) for f in fs))
                   for s, fs in sorted(per_split.items()))
    root = os.path.abspath(os.path.expanduser(image_root)) if image_root else ""
    config = CaptionFilesConfig(
        name=name or "unnamed", splits=splits, image_root=root, max_side=max_side,
        max_pixels=max_pixels, max_image_bytes=max_image_bytes,
        max_caption_chars=max_caption_chars, allow_outside_root=bool(allow_outside_root),
        num_workers=num_workers, description=f"{fmt} files: {dict(splits)}, image_root={root!r}")
    if not name:
        h = hashlib.sha1(repr((fmt, splits, root, max_side, max_pixels, max_image_bytes,
                               max_caption_chars, bool(allow_outside_root))).encode())
        for _, fs in splits:
            for f in fs:
                st = os.stat(f)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(_image_fingerprint(fmt, splits, root, _record_options(config), num_workers))
        config.name = f"h{h.hexdigest()[:12]}"
    return config


def build_dataset(fmt: str, files, *, split: str = "train", image_root: str | None = None,
                  data_dir: str | None = None, max_side: int = images_lib.DEFAULT_MAX_SIDE,
                  max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
                  max_image_bytes: int = images_lib.DEFAULT_MAX_BYTES,
                  max_caption_chars: int = records_lib.DEFAULT_MAX_CAPTION_CHARS,
                  allow_outside_root: bool = False, num_workers: int = 4,
                  name: str | None = None) -> tuple[_CaptionBuilder, dict[str, Any]]:
    """Prepares the dataset (or reuses a prepared one); returns (builder, summary per split)."""
    config = make_config(fmt, files, split=split, image_root=image_root, max_side=max_side,
                         max_pixels=max_pixels, max_image_bytes=max_image_bytes,
                         max_caption_chars=max_caption_chars,
                         allow_outside_root=allow_outside_root, num_workers=num_workers,
                         name=name)
    builder = open_builder(BUILDERS[fmt], config, data_dir)
    summary_path = os.path.join(builder.data_dir, SUMMARY_FILE)
    if builder.is_prepared():
        log.info("reusing prepared dataset %s", builder.data_dir)
        summary = {}
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
    else:
        try:
            builder.download_and_prepare()
        except AssertionError as e:  # TFDS refuses to write a split without examples
            empty = {k: v.to_dict() for k, v in builder.summaries.items() if v.kept == 0}
            if not empty:
                raise
            raise ValueError(f"dataset {builder.name}/{config.name}: no usable examples in "
                             + "; ".join(f"split {k!r}: skipped {v['skipped']}, first offenders "
                                         f"{v['examples']}" for k, v in empty.items())
                             + ". Check the files and image_root") from e
        summary = {s: builder.summaries[s].to_dict() for s in builder.summaries}
        summary["_reuse"] = (
            f"this dataset ({config.name}) is reused while its annotation files, the images "
            "they name (names, sizes, modification times) and the build settings are unchanged"
            + (" (an explicit data.name: reused whatever changes; delete this directory or "
               "pick another name to rebuild)" if name else "; any change builds a new one"))
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        log.info("build summary written to %s", summary_path)
        publish(builder, data_dir)
    return builder, summary


def open_source(builder: _CaptionBuilder, split: str = "train"):
    """Random-access source of a prepared split, read with tfds.data_source (no TensorFlow)."""
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in dataset {builder.data_dir}; it has "
                         f"{sorted(builder.info.splits)}")
    return tfds.data_source(f"{builder.name}/{builder.builder_config.name}:{builder.version}",
                            data_dir=os.path.dirname(os.path.dirname(os.path.dirname(
                                builder.data_dir))), split=split)

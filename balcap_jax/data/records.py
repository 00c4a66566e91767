"""Caption annotation files -> `Record`s (image path, id, references, prompt), with a `Summary`.

Three input formats, all text only (images are read later, in `images.load_image`):
- "sharegpt4v": a JSON list or JSONL of {"id", "image", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": caption}]} ("role"/"content" and
  "user"/"assistant" are accepted too). The first model turn is the reference, the human turn
  before it the record's own prompt.
- "coco": {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}; all
  captions of an image become its references.
- "captions": a CSV with an `image` and a `caption` column, or JSONL/JSON records with "image" and
  "caption" (or a "captions"/"references" list); optional `image_id` and `prompt`. Several rows
  for one image become several references (this is also the re-captioning tool's output).

Bad input is never fatal and never silent: each skipped record or fix is counted by reason in
the `Summary`, which keeps the first few offenders (file:line and id) for the message. A
malformed JSONL line is skipped and counted with its line number; a malformed whole JSON file
raises, naming the file and position, because nothing in it can be trusted.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator

from balcap_jax.data.images import BAD_PATH, OUTSIDE_ROOT, inside_root, resolve_path

log = logging.getLogger(__name__)

# Record-level reasons (image-level ones live in images.py).
MALFORMED_LINE = "malformed_line"
MALFORMED_RECORD = "malformed_record"
MISSING_IMAGE_FIELD = "missing_image_field"
MISSING_REFERENCE = "missing_reference"
EMPTY_REFERENCE = "empty_reference"
DUPLICATE_ID = "duplicate_id"
ORPHAN_ANNOTATION = "orphan_annotation"
# Fixes (the record is kept).
MERGED_DUPLICATE_ID = "merged_duplicate_id"
DROPPED_EMPTY_REFERENCE = "dropped_empty_reference"
CUT_LONG_REFERENCE = "cut_long_reference"
DEFAULT_MAX_CAPTION_CHARS = 20000

_MODEL_ROLES = ("gpt", "assistant", "model")
_HUMAN_ROLES = ("human", "user")
_JSONL_EXTS = (".jsonl", ".ndjson")


@dataclasses.dataclass
class Record:
    image: str              # resolved path of the image file
    image_id: str
    references: list[str]
    prompt: str = ""        # the record's own instruction, if the format has one
    where: str = ""         # "file:line" for messages
    root: str = ""          # the image root the path was resolved against


class Summary:
    """Counts per reason (skipped records, fixes applied) and the first offenders of each."""

    def __init__(self, max_examples: int = 5):
        self.max_examples = max_examples
        self.kept = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.fixed: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def _note(self, reason: str, where: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self._note(reason, where)

    def fix(self, reason: str, where: str) -> None:
        self.fixed[reason] += 1
        self._note(reason, where)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "skipped_total": sum(self.skipped.values()),
                "skipped": dict(sorted(self.skipped.items())),
                "fixed": dict(sorted(self.fixed.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def message(self, title: str) -> str:
        lines = [f"{title}: kept {self.kept}, skipped {sum(self.skipped.values())}"]
        for kind, counter in (("skipped", self.skipped), ("fixed", self.fixed)):
            for reason, n in sorted(counter.items()):
                first = "; ".join(self.examples.get(reason, []))
                lines.append(f"  {kind} {reason}: {n} (first: {first})")
        return "\n".join(lines)

    def log(self, title: str) -> None:
        (log.warning if self.skipped else log.info)(self.message(title))


def _where(path: str, line: int | None, ident: Any = None) -> str:
    s = f"{os.path.basename(path)}:{line}" if line is not None else os.path.basename(path)
    return s if ident is None else f"{s} (id={ident})"


def _clean(text: Any) -> str:
    return text.strip() if isinstance(text, str) else ""


def _load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} "
                         f"(character {e.pos}): {e.msg}. Fix the file, or write it as JSONL "
                         "(one record per line) so bad lines are skipped and counted") from None


def iter_json_records(path: str, summary: Summary) -> Iterator[tuple[int | None, Any]]:
    """(line number or list index, object) for JSONL files or a JSON list; JSONL lines that do
    not parse are skipped and counted under `malformed_line`."""
    if path.endswith(_JSONL_EXTS):
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    summary.skip(MALFORMED_LINE, f"{_where(path, lineno)}: {e.msg} at column "
                                 f"{e.colno}")
        return
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records (or a .jsonl file), got "
                         f"{type(data).__name__}")
    yield from enumerate(data)


def _references(values: Iterable[Any], where: str, summary: Summary) -> list[str]:
    """Non-empty stripped references, in order, exact repeats removed; counts dropped empties."""
    refs, empties = [], 0
    for v in values:
        t = _clean(v)
        if not t:
            empties += 1
        elif t not in refs:
            refs.append(t)
    if refs and empties:
        for _ in range(empties):
            summary.fix(DROPPED_EMPTY_REFERENCE, where)
    return refs


def _default_root(path: str, image_root: str | None) -> str:
    return image_root if image_root else os.path.dirname(os.path.abspath(path))


def read_sharegpt4v(files: Iterable[str], image_root: str | None,
                    summary: Summary) -> list[Record]:
    out = []
    for path in files:
        root = _default_root(path, image_root)
        for line, item in iter_json_records(path, summary):
            where = _where(path, line, item.get("id") if isinstance(item, dict) else None)
            if not isinstance(item, dict):
                summary.skip(MALFORMED_RECORD, f"{where}: not a JSON object")
                continue
            image = item.get("image")
            if image is not None and not isinstance(image, str):
                summary.skip(MALFORMED_RECORD, f"{where}: 'image' is a {type(image).__name__}, "
                             "not one path (multi-image records are not captions)")
                continue
            if not image or not image.strip():
                summary.skip(MISSING_IMAGE_FIELD, where)
                continue
            convs = item.get("conversations")
            if not isinstance(convs, list):
                summary.skip(MISSING_REFERENCE, f"{where}: no 'conversations' list")
                continue
            prompt, caption, found = "", None, False
            for turn in convs:
                if not isinstance(turn, dict):
                    continue
                role = str(turn.get("from", turn.get("role", ""))).lower()
                text = turn.get("value", turn.get("content"))
                if role in _HUMAN_ROLES:
                    prompt = _clean(text).replace("<image>", "").strip()
                elif role in _MODEL_ROLES:
                    caption, found = text, True
                    break
            if not found:
                summary.skip(MISSING_REFERENCE, f"{where}: no gpt/assistant turn")
                continue
            refs = _references([caption], where, summary)
            if not refs:
                summary.skip(EMPTY_REFERENCE, where)
                continue
            ident = item.get("id")
            ident = str(ident) if ident not in (None, "") else image.strip()
            out.append(Record(resolve_path(image.strip(), root), ident, refs, prompt, where,
                              root))
    return out


def read_coco(files: Iterable[str], image_root: str | None, summary: Summary) -> list[Record]:
    out = []
    for path in files:
        root = _default_root(path, image_root)
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
                not isinstance(data.get("annotations"), list):
            raise ValueError(f"{path}: a COCO captions file needs top-level 'images' and "
                             "'annotations' lists")
        images: dict[str, tuple[str, str]] = {}  # id -> (file_name, where)
        order: list[str] = []
        for i, im in enumerate(data["images"]):
            where = _where(path, None, im.get("id") if isinstance(im, dict) else None)
            where = f"{where} images[{i}]"
            if not isinstance(im, dict) or "id" not in im:
                summary.skip(MALFORMED_RECORD, f"{where}: image entry without an id")
                continue
            ident, name = str(im["id"]), im.get("file_name")
            if not isinstance(name, str) or not name.strip():
                summary.skip(MISSING_IMAGE_FIELD, where)
                continue
            if ident in images:
                # Same id twice: the second is dropped (even if it names the same file, its
                # annotations are already attached to the first).
                summary.skip(DUPLICATE_ID, where)
                continue
            images[ident] = (name.strip(), where)
            order.append(ident)
        caps: dict[str, list[Any]] = collections.defaultdict(list)
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann:
                summary.skip(MALFORMED_RECORD, f"{_where(path, None)} annotations[{i}]: no "
                             "image_id")
                continue
            ident = str(ann["image_id"])
            if ident not in images:
                summary.skip(ORPHAN_ANNOTATION, f"{_where(path, None, ident)} annotations[{i}]")
                continue
            caps[ident].append(ann.get("caption"))
        for ident in order:
            name, where = images[ident]
            if ident not in caps:
                summary.skip(MISSING_REFERENCE, f"{where}: no annotation")
                continue
            refs = _references(caps[ident], where, summary)
            if not refs:
                summary.skip(EMPTY_REFERENCE, where)
                continue
            out.append(Record(resolve_path(name, root), ident, refs, "", where, root))
    return out


def _plain_items(path: str, summary: Summary) -> Iterator[tuple[int | None, Any]]:
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames or not (
                    {"caption", "captions"} & set(reader.fieldnames)):
                raise ValueError(f"{path}: a captions CSV needs a header with 'image' and "
                                 f"'caption' columns, got {reader.fieldnames}")
            for row in reader:
                yield reader.line_num, row
        return
    yield from iter_json_records(path, summary)


def read_plain(files: Iterable[str], image_root: str | None, summary: Summary) -> list[Record]:
    out = []
    for path in files:
        root = _default_root(path, image_root)
        for line, item in _plain_items(path, summary):
            if not isinstance(item, dict):
                summary.skip(MALFORMED_RECORD, f"{_where(path, line)}: not a JSON object")
                continue
            ident = item.get("image_id", item.get("id"))
            where = _where(path, line, ident)
            image = item.get("image", item.get("file_name"))
            if not isinstance(image, str) or not image.strip():
                summary.skip(MISSING_IMAGE_FIELD, where)
                continue
            if "caption" in item and item["caption"] is not None:
                values = [item["caption"]]
            else:
                values = item.get("captions", item.get("references"))
                values = [values] if isinstance(values, str) else values
            if not values:
                summary.skip(MISSING_REFERENCE, where)
                continue
            refs = _references(values, where, summary)
            if not refs:
                summary.skip(EMPTY_REFERENCE, where)
                continue
            ident = str(ident) if ident not in (None, "") else image.strip()
            out.append(Record(resolve_path(image.strip(), root), ident, refs,
                              _clean(item.get("prompt")), where, root))
    return out


def deduplicate(records: Iterable[Record], summary: Summary) -> list[Record]:
    """One record per id, first-seen order. The same id with the same image merges references
    (counted as a fix); the same id with a different image is skipped as `duplicate_id`."""
    by_id: dict[str, Record] = {}
    for r in records:
        first = by_id.get(r.image_id)
        if first is None:
            by_id[r.image_id] = dataclasses.replace(r, references=list(r.references))
        elif os.path.normpath(first.image) == os.path.normpath(r.image):
            first.references.extend(x for x in r.references if x not in first.references)
            summary.fix(MERGED_DUPLICATE_ID, r.where)
        else:
            summary.skip(DUPLICATE_ID, f"{r.where}: id already used by {first.where} for "
                         f"another image")
    return list(by_id.values())


READERS: dict[str, Callable[[Iterable[str], str | None, Summary], list[Record]]] = {
    "sharegpt4v": read_sharegpt4v, "coco": read_coco, "captions": read_plain}


def cut_reference(text: str, max_chars: int) -> str:
    """`text` cut to at most max_chars: at the last sentence end that keeps at least half of
    it, else at the last space, else hard."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    end = max(head.rfind(". "), head.rfind(".\n"), head.rfind("! "), head.rfind("? "))
    if end >= max_chars // 2:
        return head[:end + 1]
    space = head.rfind(" ")
    return (head[:space] if space >= max_chars // 2 else head).rstrip()


def _checked(records: Iterable[Record], summary: Summary, *, allow_outside: bool,
             max_caption_chars: int) -> Iterator[Record]:
    """Skips records whose image path is unusable (a NUL byte; outside its image root unless
    allowed) and cuts over-long references (counted as a fix)."""
    for r in records:
        if "\0" in r.image:
            summary.skip(BAD_PATH, f"{r.where}: the image path holds a NUL byte")
            continue
        if not allow_outside and r.root and not inside_root(r.image, r.root):
            summary.skip(OUTSIDE_ROOT, f"{r.where}: {r.image} is outside the image root "
                         f"{r.root} (data.allow_outside_root=True reads it)")
            continue
        refs = []
        for ref in r.references:
            if len(ref) > max_caption_chars:
                summary.fix(CUT_LONG_REFERENCE, f"{r.where}: {len(ref)} characters")
                ref = cut_reference(ref, max_caption_chars)
            refs.append(ref)
        yield dataclasses.replace(r, references=refs)


def read_records(fmt: str, files: Iterable[str], image_root: str | None,
                 summary: Summary, *, allow_outside: bool = False,
                 max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> list[Record]:
    """All records of `files` in format `fmt`, checked (paths inside the image root, or the
    annotation file's folder, unless `allow_outside`; references cut at max_caption_chars) and
    deduplicated by id."""
    if fmt not in READERS:
        raise ValueError(f"unknown caption format {fmt!r}; use one of {sorted(READERS)}")
    files = list(files)
    if not files:
        raise ValueError(f"no annotation files given for format {fmt!r}")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"annotation file {f!r} does not exist")
    records = READERS[fmt](files, image_root, summary)
    return deduplicate(_checked(records, summary, allow_outside=allow_outside,
                                max_caption_chars=max_caption_chars), summary)

"""Fake buckets for gs:// through fsspec (not the OS path functions): `MemoryBucket`, in this
process's memory, and `DirBucket`, served from a local directory, so that several processes
share one fake bucket: gs://b/x is $BALCAP_FAKE_BUCKET_ROOT/b/x."""
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem


class MemoryBucket(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}          # insertion-ordered: the order files were written in
    pseudo_dirs = [""]


def memory_bucket(monkeypatch, mirror_root: str):
    """gs:// in memory, emptied, and workdir's local mirrors under `mirror_root` (a machine)."""
    from balcap_jax import workdir
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, MemoryBucket, clobber=True)
    MemoryBucket.store.clear()
    MemoryBucket.pseudo_dirs[:] = [""]
    monkeypatch.setattr(workdir, "MIRROR_ROOT", mirror_root)
    return MemoryBucket


class DirBucket(LocalFileSystem):
    protocol = ("gs", "gcs")
    root = ""

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix):])
        return super()._strip_protocol(path)


def install(root: str) -> None:
    DirBucket.root = os.path.abspath(root)
    os.makedirs(DirBucket.root, exist_ok=True)
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, DirBucket, clobber=True)

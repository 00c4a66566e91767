"""gs:// served from a local directory through fsspec (not the OS path functions), so that
several processes share one fake bucket: gs://b/x is $BALCAP_FAKE_BUCKET_ROOT/b/x."""
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


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

"""The run's directory: a local path or a bucket URL (gs://, s3://), through etils.epath.

Files written whole (config.json, scorer_metadata.json) go straight to the workdir. Files that
grow during a run or that a library writes through the OS (metrics.jsonl, completions.jsonl,
TensorBoard events, the judges' SQLite cache, the export's safetensors) are written in a local
`Mirror` directory and copied up by `Mirror.sync`: an object store cannot append to a file,
and SQLite cannot live in one. Orbax writes the checkpoints to the URL itself. For a local
workdir every function here is the plain OS operation and a mirror is the directory itself.
"""
from __future__ import annotations

import hashlib
import os
import shutil

from etils import epath

__all__ = ["is_remote", "join", "exists", "makedirs", "write_text", "download_dir",
           "upload_dir", "Mirror"]

MIRROR_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "balcap_jax", "mirror")


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def join(workdir, *names: str) -> str:
    if is_remote(workdir):
        return os.fspath(epath.Path(workdir).joinpath(*names))
    return os.path.join(workdir, *names)


def exists(path) -> bool:
    return epath.Path(path).exists()


def makedirs(path) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def write_text(path, text: str) -> None:
    """The whole file at once (atomically on a local disk: a crash leaves the old one)."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
    """Streams one file across backends (local <-> bucket) without holding it in memory."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fi, dst.open("wb") as fo:
        shutil.copyfileobj(fi, fo, 16 << 20)


def _copy(src: epath.Path, dst: epath.Path) -> int:
    """A file or a directory tree from src to dst; returns the number of files copied. Walks
    with iterdir (base names on every backend; fsspec's walk names roots per backend)."""
    if not src.exists():
        return 0
    if not src.is_dir():
        _copy_file(src, dst)
        return 1
    return sum(_copy(child, dst / child.name) for child in src.iterdir())


def download_dir(remote, local: str) -> int:
    """A remote folder copied to the local `local`, replacing it whole: the copy is made
    beside it and renamed, so a crash never leaves a partial folder under the final name."""
    tmp = f"{local}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    n = _copy(epath.Path(remote), epath.Path(tmp))
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)
    return n


def upload_dir(local: str, remote, *, last: str | None = None) -> int:
    """A local folder copied up to `remote`; its top-level file `last` goes after all the rest
    (a marker whose presence tells readers the folder is complete)."""
    src, dst = epath.Path(local), epath.Path(remote)
    n = sum(_copy(child, dst / child.name) for child in src.iterdir() if child.name != last)
    if last is not None:
        n += _copy(src / last, dst / last)
    return n


class Mirror:
    """A local directory standing in for `remote` (a workdir or a folder of one).

    `pull(names)` replaces the local copies of those files or folders with the remote ones
    (on resume); `sync(names)` copies the local ones up (after each write that matters). For
    a local `remote` the mirror is the directory itself and both are no-ops."""

    def __init__(self, remote, local: str | None = None):
        self.remote = os.fspath(remote)
        self.is_remote = is_remote(self.remote)
        if not self.is_remote:
            self.local = self.remote
        else:
            digest = hashlib.sha1(self.remote.encode()).hexdigest()[:16]
            self.local = local or os.path.join(MIRROR_ROOT, digest)
            os.makedirs(self.local, exist_ok=True)

    def path(self, *names: str) -> str:
        return os.path.join(self.local, *names)

    def pull(self, *names: str) -> None:
        if not self.is_remote:
            return
        for name in names:
            local = epath.Path(self.path(name))
            if local.is_dir():
                shutil.rmtree(local)
            elif local.exists():
                local.unlink()
            _copy(epath.Path(self.remote) / name, local)

    def sync(self, *names: str) -> None:
        """Copies the named local files or folders (all of the mirror when none) up."""
        if not self.is_remote:
            return
        for name in names or sorted(os.listdir(self.local)):
            _copy(epath.Path(self.path(name)), epath.Path(self.remote) / name)

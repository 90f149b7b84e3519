"""Writing files so that nothing that existed is ever half-overwritten or lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctxedit.errors import ModelError, RunError

TEMPORARY = ".tmp-"  # atomic_path writes .<stem>.tmp-<pid><suffix> beside the destination


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, when `path` exists and `--overwrite` was not given."""
    if path.exists() and not overwrite:
        raise RunError(f"{path} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_path(dest: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds."""
    refuse_overwrite(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}{TEMPORARY}{os.getpid()}{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield an empty folder beside `dest`; it takes the place of `dest` only if the block succeeds."""
    tmp, old = (dest.with_name(f".{dest.name}.{kind}-{os.getpid()}") for kind in ("partial", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json(dest: Path, data: dict) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_free_space(folder: Path, needed: int, what: str, remedy: str) -> None:
    """Refuse, before writing, `needed` bytes that `folder`'s disk has no room for."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise RunError(f"{what} would take about {_size(needed)} in {folder}, which has {_size(free)} free; {remedy}")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files and folders a killed process left in `folder` and its subfolders (never a
    finished file)."""
    for path in folder.glob(f"**/.*{TEMPORARY}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def require_file(path: Path, expected: str | None, what: str) -> None:
    """A ModelError unless `path` is a file (`expected`: the digest a run recorded, whose file is then missing)."""
    if not path.is_file():
        tuned = "; the run was tuned with it: put it back or tune again" if expected else ""
        raise ModelError(f"{what} {path} does not exist{tuned}")


def verified_sha256(path: Path, expected: str | None, what: str) -> str:
    """The sha256 of `path`; with `expected` (what a run recorded), a ModelError unless it is still that file."""
    require_file(path, expected, what)
    digest = sha256_of(path)
    if expected is not None and digest != expected:
        raise ModelError(
            f"{what} {path} has changed since the run was tuned (sha256 {digest[:12]}..., was {expected[:12]}...); "
            "put the original back or tune again"
        )
    return digest

"""Where the project's files live: a local path, or an object-store URI (`s3://bucket/key`).

Through `pyarrow.fs`, the filesystem layer Ray Train already uses for its checkpoints, so one
set of credentials and one endpoint serve shards, checkpoints and the index. The standard
AWS variables configure it (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION);
AWS_ENDPOINT_URL points it at an S3-compatible server (MinIO, moto, Ceph) instead of AWS.

Object stores have no rename, so nothing here pretends to: writers upload whole files, and
readers of the index trust a version only once its LATEST pointer, written last, names it.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str | Path) -> bool:
    return isinstance(uri, str) and "://" in uri and not uri.startswith("file://")


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kw: dict = {"region": region or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        kw |= {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "http"}
    return pafs.S3FileSystem(**kw)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for an s3:// or other pyarrow URI."""
    if uri.startswith("s3://"):
        return _s3(os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_DEFAULT_REGION")), uri[len("s3://"):].rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def child(base: str | Path, name: str) -> str | Path:
    """`name` under a local directory or an object-store prefix."""
    return join(base, name) if is_remote(base) else Path(base) / name


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def put_file(local: Path, uri: str) -> None:
    fs, path = filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def get_file(uri: str, local: Path) -> None:
    fs, path = filesystem(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_names(uri: str) -> list[str]:
    """Names directly under a prefix (files and 'directories')."""
    fs, path = filesystem(uri)
    return sorted(Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    try:
        fs.delete_dir(path)
    except OSError:
        pass  # an object store may have no directory object left to delete

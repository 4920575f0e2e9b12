"""Fetch one artifact from ``gs://bucket/path``, ``file://`` or a local path into a local file.

Every fetch hashes what it writes (sha256), and a GCS download is checked against
the object's own checksum by the client. Failures become ``ImportFailure`` with a
one-line message; credentials never appear in one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from model_import.errors import ImportFailure

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Fetched:
    uri: str
    path: Path
    sha256: str
    size_bytes: int


def fetch(uri: str, destination: Path) -> Fetched:
    """Copy the artifact at ``uri`` to ``destination``."""
    parsed = urlparse(uri)
    if parsed.scheme == "gs":
        return _fetch_gcs(uri, parsed.netloc, parsed.path.lstrip("/"), destination)
    if parsed.scheme == "file":
        return _fetch_local(uri, Path(unquote(parsed.path)), destination)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return _fetch_local(uri, Path(uri).expanduser(), destination)
    raise ImportFailure(f"{uri}: unsupported URI scheme {parsed.scheme!r} (use gs://, file:// or a local path)")


def _fetch_local(uri: str, source: Path, destination: Path) -> Fetched:
    if not source.is_file():
        raise ImportFailure(f"{uri}: no such file")
    try:
        with source.open("rb") as reader, destination.open("wb") as writer:
            digest = _copy(reader, writer, total=source.stat().st_size, label=source.name)
    except PermissionError:
        raise ImportFailure(f"{uri}: permission denied") from None
    return Fetched(uri, destination, digest.hexdigest(), destination.stat().st_size)


def _copy(reader: BinaryIO, writer: BinaryIO, total: int, label: str) -> hashlib._Hash:
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None, leave=False) as bar:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            bar.update(len(chunk))
    return digest


class _HashingWriter:
    """A file wrapper that hashes and reports progress on what the GCS client writes."""

    def __init__(self, file: BinaryIO, bar: tqdm):
        self.file, self.bar, self.digest = file, bar, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bar.update(len(data))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def _fetch_gcs(uri: str, bucket_name: str, object_name: str, destination: Path) -> Fetched:
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud.storage.exceptions import DataCorruption

    if not bucket_name or not object_name:
        raise ImportFailure(f"{uri}: expected gs://BUCKET/OBJECT")
    try:
        blob = _gcs_client().bucket(bucket_name).blob(object_name)
        blob.reload()  # size and checksums; fails early on a missing object or no access
        with (
            destination.open("wb") as file,
            tqdm(
                total=blob.size, unit="B", unit_scale=True, desc=Path(object_name).name, disable=None, leave=False
            ) as bar,
        ):
            writer = _HashingWriter(file, bar)
            blob.download_to_file(writer, checksum="auto")
    except DataCorruption:
        raise ImportFailure(f"{uri}: checksum mismatch, the download is corrupt") from None
    except api_exceptions.NotFound:
        raise ImportFailure(f"{uri}: no such object (or no such bucket)") from None
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as exc:
        raise ImportFailure(f"{uri}: permission denied ({exc.code})") from None
    except auth_exceptions.GoogleAuthError as exc:
        raise ImportFailure(
            f"{uri}: no usable Google Cloud credentials ({type(exc).__name__}); "
            "set CLOUDSDK_AUTH_ACCESS_TOKEN or configure Application Default Credentials"
        ) from None
    except (api_exceptions.GoogleAPIError, OSError) as exc:
        raise ImportFailure(f"{uri}: download failed ({type(exc).__name__})") from None
    size = destination.stat().st_size
    if blob.size is not None and size != blob.size:
        raise ImportFailure(f"{uri}: downloaded {size} bytes, the object has {blob.size}")
    return Fetched(uri, destination, writer.digest.hexdigest(), size)


def _gcs_client():
    """A storage client using the original project's conventions for credentials.

    ``CLOUDSDK_AUTH_ACCESS_TOKEN`` (a bearer token) wins; with ``STORAGE_EMULATOR_HOST``
    set and no token, the client is anonymous; otherwise Application Default Credentials.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from google.oauth2.credentials import Credentials

    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    token = os.environ.get("CLOUDSDK_AUTH_ACCESS_TOKEN")
    if token:
        return storage.Client(project=project, credentials=Credentials(token))
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=project or "emulator", credentials=AnonymousCredentials())
    return storage.Client(project=project)

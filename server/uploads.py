"""Reading an uploaded adapter: loose files or one .tar.gz/.zip archive, within a size limit."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import PurePosixPath

from adapter_store.errors import InvalidRequestError, PayloadTooLargeError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def _basename(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).name


def unpack(files: list[tuple[str, bytes]], max_bytes: int) -> dict[str, bytes]:
    """(file name, bytes) pairs -> {base name: bytes}. One archive is unpacked (its folders are
    flattened, so an archive of a PEFT folder works); members are read, never extracted to disk."""
    total = sum(len(b) for _, b in files)
    if total > max_bytes:
        raise PayloadTooLargeError(f"upload of {total} bytes exceeds the limit of {max_bytes} bytes")
    if len(files) == 1 and files[0][0].lower().endswith(ARCHIVE_SUFFIXES):
        return _unpack_archive(*files[0], max_bytes)
    out: dict[str, bytes] = {}
    for name, data in files:
        base = _basename(name)
        if base in out:
            raise InvalidRequestError(f"file {base!r} was sent twice", param="files")
        out[base] = data
    return out


def _unpack_archive(name: str, data: bytes, max_bytes: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    total = 0

    def add(member: str, size: int, read) -> None:
        nonlocal total
        base = _basename(member)
        if not base or base.startswith("._"):  # folders, macOS resource forks
            return
        total += size
        if total > max_bytes:
            raise PayloadTooLargeError(f"archive {name!r} unpacks to more than the limit of {max_bytes} bytes")
        if base in out:
            raise InvalidRequestError(f"archive {name!r} holds {base!r} twice", param="files")
        out[base] = read()

    try:
        if name.lower().endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        add(info.filename, info.file_size, lambda i=info: z.read(i))
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
                for m in t.getmembers():
                    if m.isfile():
                        add(m.name, m.size, lambda m=m: t.extractfile(m).read())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InvalidRequestError(f"archive {name!r} cannot be read: {exc}", param="files") from exc
    return out


def pack_tar_gz(files: dict[str, bytes], folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for fname, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{folder}/{fname}")
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()

"""Reading an uploaded adapter: loose files or one .tar.gz/.zip archive, within a size limit.

The HTTP layer streams an upload's files to temporary files as they arrive (python-multipart's spooled
files), with the body's size counted as it is read (limits.BodySizeLimit); :func:`unpack` then runs in
a worker thread, never on the event loop."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import tarfile
import zipfile
from pathlib import PurePosixPath

from lora.errors import InvalidRequestError, MosaicError
from server.edge.errors import PayloadTooLargeError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")


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


MAX_MEMBERS = 64  # files in one archive (a PEFT folder holds a handful)
MAX_RATIO = 100  # uncompressed / compressed bytes, checked once a member has produced RATIO_AFTER bytes
RATIO_AFTER = 2**20
CHUNK = 2**20


def _decompressed(raw: io.BytesIO):
    """A file object that decompresses ``raw`` as it is read, a bounded amount per read (tarfile's own
    stream mode inflates a whole compressed block at once: 422 bytes of bzip2 can be 400 MB)."""
    head = raw.getvalue()[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw, mode="rb")
    return contextlib.nullcontext(raw)


HEADER_ROOM = 64 * 1024  # uncompressed header bytes allowed per tar member (names, pax records)


class _Bounded:
    """A read-only stream that hands out at most ``budget`` bytes of ``plain`` and stops as soon as it has
    expanded more than MAX_RATIO-fold over the compressed bytes consumed from ``raw``."""

    def __init__(self, plain, raw: io.BytesIO, budget: int, refuse) -> None:
        self.plain, self.raw, self.budget, self.refuse, self.given = plain, raw, budget, refuse, 0

    def read(self, n: int = -1) -> bytes:
        room = self.budget - self.given + 1
        data = self.plain.read(room if n is None or n < 0 else min(n, room))
        self.given += len(data)
        if self.given > self.budget:
            self.refuse(f"unpacks to more than the limit of {self.budget} bytes")
        if self.given > RATIO_AFTER and self.given > MAX_RATIO * max(self.raw.tell(), 1):
            self.refuse(f"expands more than {MAX_RATIO}-fold (a compression bomb?)")
        return data


def _unpack_archive(name: str, data: bytes, max_bytes: int) -> dict[str, bytes]:
    """Members are read one at a time, in order (tar in stream mode over a bounded decompressor);
    before each member its count and declared size are checked, and while it is read, the total size
    and the compression ratio so far, so an archive bomb stops at the first member that crosses a limit."""
    out: dict[str, bytes] = {}
    raw = io.BytesIO(data)
    produced = 0

    def refuse(why: str):
        raise PayloadTooLargeError(f"archive {name!r} {why}")

    def add(member: str, size: int, stream, members: int) -> None:
        nonlocal produced
        if members > MAX_MEMBERS:
            refuse(f"holds more than {MAX_MEMBERS} files")
        base = _basename(member)
        if not base or base.startswith("._"):  # folders, macOS resource forks
            return
        if produced + size > max_bytes:
            refuse(f"unpacks to more than the limit of {max_bytes} bytes")
        if base in out:
            raise InvalidRequestError(f"archive {name!r} holds {base!r} twice", param="files")
        parts = []
        while chunk := stream.read(min(CHUNK, max_bytes - produced + 1)):
            produced += len(chunk)
            parts.append(chunk)
            if produced > max_bytes:
                refuse(f"unpacks to more than the limit of {max_bytes} bytes")
            if produced > RATIO_AFTER and produced > MAX_RATIO * max(raw.tell(), 1):
                refuse(f"expands more than {MAX_RATIO}-fold (a compression bomb?)")
        out[base] = b"".join(parts)

    try:
        if name.lower().endswith(".zip"):
            with zipfile.ZipFile(raw) as z:
                infos = [i for i in z.infolist() if not i.is_dir()]
                if len(infos) > MAX_MEMBERS:
                    refuse(f"holds more than {MAX_MEMBERS} files")
                for n, info in enumerate(infos, 1):
                    if info.flag_bits & 0x1:
                        raise InvalidRequestError(f"archive {name!r} holds an encrypted file ({info.filename!r})", param="files")
                    if info.file_size > RATIO_AFTER and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                        refuse(f"expands more than {MAX_RATIO}-fold (a compression bomb?)")
                    with z.open(info) as stream:
                        add(info.filename, info.file_size, stream, n)
        else:
            # every byte tarfile reads counts, headers and skipped members included (a pax header or a
            # skipped member would otherwise be inflated whole): the members' own limit, plus their headers
            budget = max_bytes + (MAX_MEMBERS + 2) * HEADER_ROOM
            with _decompressed(raw) as plain, tarfile.open(fileobj=_Bounded(plain, raw, budget, refuse), mode="r|") as t:
                for n, m in enumerate(t, 1):
                    if n > MAX_MEMBERS:
                        refuse(f"holds more than {MAX_MEMBERS} entries")
                    if m.isfile():
                        add(m.name, m.size, t.extractfile(m), n)
    except MosaicError:
        raise
    except Exception as exc:  # noqa: BLE001 - the stdlib readers raise many types on corrupt bytes (zlib.error,
        # IndexError, struct.error, UnicodeDecodeError, ...): each is an archive that cannot be read
        raise InvalidRequestError(f"archive {name!r} cannot be read ({type(exc).__name__})", param="files") from None
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

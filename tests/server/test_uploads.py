"""Reading uploads: loose files, archives (flattened, size-limited), and refusals."""

import io
import tarfile
import zipfile

import pytest

from adapter_store.errors import InvalidRequestError, PayloadTooLargeError
from server.uploads import pack_tar_gz, unpack


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_loose_files_and_archives():
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    assert unpack(list(files.items()), 100) == files
    assert unpack([("a.tar.gz", _tar({"folder/" + k: v for k, v in files.items()}))], 1000) == files
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in files.items():
            z.writestr("x/" + k, v)
    assert unpack([("a.zip", buf.getvalue())], 1000) == files
    assert unpack([("round.tar.gz", pack_tar_gz(files, "skill"))], 1000) == files


def test_path_traversal_is_flattened_never_written():
    got = unpack([("evil.tar.gz", _tar({"../../etc/adapter_config.json": b"{}"}))], 1000)
    assert got == {"adapter_config.json": b"{}"}


def test_limits_and_bad_archives():
    with pytest.raises(PayloadTooLargeError):
        unpack([("adapter_model.safetensors", b"x" * 101)], 100)
    with pytest.raises(PayloadTooLargeError):  # a small archive that unpacks big
        unpack([("bomb.tar.gz", _tar({"adapter_model.safetensors": b"\0" * 10_000}))], 1000)
    with pytest.raises(InvalidRequestError, match="cannot be read"):
        unpack([("broken.tar.gz", b"not an archive")], 100)
    with pytest.raises(InvalidRequestError, match="twice"):
        unpack([("a/adapter_config.json", b"1"), ("b/adapter_config.json", b"2")], 100)

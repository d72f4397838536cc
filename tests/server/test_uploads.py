"""Reading uploads: loose files, archives (flattened, size-limited), and refusals."""

import io
import tarfile
import zipfile

import pytest

from lora.errors import InvalidRequestError
from server.edge.errors import PayloadTooLargeError
from server.edge.uploads import pack_tar_gz, unpack


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


def _archives():
    from hypothesis import strategies as st

    members = st.lists(st.tuples(st.sampled_from(["adapter_config.json", "a/adapter_model.safetensors", "../x", "", "._y", "d/"]),
                                 st.binary(max_size=300)), max_size=5)

    def build(kind, items):
        buf = io.BytesIO()
        if kind == "zip":
            with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for n, d in items:
                    z.writestr(n or "empty", d)
            return "a.zip", buf.getvalue()
        with tarfile.open(fileobj=buf, mode={"tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz", "tar": "w"}[kind]) as t:
            for n, d in items:
                info = tarfile.TarInfo(n or "empty")
                info.size = len(d)
                t.addfile(info, io.BytesIO(d))
        return f"a.{kind}", buf.getvalue()

    def mutate(named, cuts):
        name, data = named
        data = bytearray(data)
        for pos, byte in cuts:
            if data:
                data[pos % len(data)] = byte
        return name, bytes(data)

    archive = st.builds(build, st.sampled_from(["zip", "tar.gz", "tar.bz2", "tar.xz", "tar"]), members)
    return st.builds(mutate, archive, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))


def test_any_archive_unpacks_within_limits_or_is_refused():
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(named=_archives(), limit=st_integers())
    def check(named, limit):
        try:
            out = unpack([named], limit)
        except (InvalidRequestError, PayloadTooLargeError):
            return
        assert sum(map(len, out.values())) <= limit and all("/" not in k and k for k in out)

    check()


def st_integers():
    from hypothesis import strategies as st

    return st.integers(1, 2000)

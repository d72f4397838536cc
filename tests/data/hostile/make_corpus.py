"""Writes the hostile corpus (tests/data/hostile/): uploads and request bodies that once cost the server
a 500, a stall or gigabytes, each with the answer it must get now (manifest.json). The files are
committed; run this again only to change the corpus:

    .venv/bin/python -m tests.data.hostile.make_corpus

Each upload is a set of files posted to ``POST /v1/adapters`` (file name -> path in this folder, or the
good config/weights of a tiny valid adapter); each body is posted to its path. Shapes are those of the
bundled base model (SmolLM2-135M: hidden 576, vocabulary 49152).
"""

from __future__ import annotations

import bz2
import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save

HERE = Path(__file__).resolve().parent
HIDDEN, VOCAB = 576, 49152
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def good_config(**over) -> bytes:
    return json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], **over}).encode()


def good_weights() -> bytes:
    g = torch.Generator().manual_seed(0)
    return save({f"{Q}.lora_A.weight": torch.randn(1, HIDDEN, generator=g),
                 f"{Q}.lora_B.weight": torch.randn(HIDDEN, 1, generator=g)})


def tar_bytes(members: list[tuple[str, bytes]], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def headers_bomb(n: int = 200_000) -> bytes:
    """A bzip2 tar of n folder headers: kilobytes that once took the server's event loop for many seconds."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("d")
        info.type = tarfile.DIRTYPE
        for _ in range(n):  # one header over and over: bzip2 makes almost nothing of it
            t.addfile(info)
    return bz2.compress(raw.getvalue(), 9)


def zeros_bomb_tar(size: int = 400 * 2**20) -> bytes:
    """One member of ``size`` zero bytes, bzip2: a few hundred bytes that unpack to 400 MB."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = size
        t.addfile(info, io.BytesIO(bytes(size)))
    return bz2.compress(raw.getvalue(), 9)


def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, data in members:  # a fixed date: the same corpus bytes on every run
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def safetensors_header(header: dict | bytes, length: int | None = None, tail: bytes = b"") -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + tail


def embed_lora() -> bytes:
    """A LoRA on the embeddings shaped like a linear layer (vocab x hidden): it passed validation once."""
    m = "base_model.model.model.embed_tokens"
    return save({f"{m}.lora_A.weight": torch.zeros(1, HIDDEN, dtype=torch.float16),
                 f"{m}.lora_B.weight": torch.zeros(VOCAB, 1, dtype=torch.float16)})


def many_tensors(n: int = 100_000) -> bytes:
    """A .tar.xz of a good config and a weights file of n one-value tensors (7 MB unpacked, 240 kB here): loading
    and checking it once took 2.3 s, and its error listed every tensor (9 MB)."""
    weights = save({f"x{i}": torch.zeros(1) for i in range(n)})
    return tar_bytes([("adapter_config.json", good_config()), ("adapter_model.safetensors", weights)], "w:xz")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def main() -> None:
    files: dict[str, bytes] = {
        "archives/headers.tar.bz2": headers_bomb(),
        "archives/zeros.tar.bz2": zeros_bomb_tar(),
        "archives/many.zip": zip_bytes([(f"f{i}", b"") for i in range(1000)]),
        "archives/zeros.zip": zip_bytes([("adapter_model.safetensors", bytes(64 * 2**20)), ("adapter_config.json", good_config())]),
        "archives/not_an_archive.tar.gz": b"\x1f\x8b\x08\x00garbage" * 10,
        "configs/catastrophic_pattern.json": good_config(rank_pattern={"(.*.*.*.*)*z": 1}),
        "configs/invalid_pattern.json": good_config(rank_pattern={"(": 1}),
        "configs/long_pattern.json": good_config(alpha_pattern={"a" * 10_000: 1}),
        "configs/string_rank.json": good_config(rank_pattern={"q_proj": "8"}),
        "configs/nan_alpha.json": good_config().replace(b'"lora_alpha": 2', b'"lora_alpha": NaN'),
        "configs/huge_rank.json": good_config(r=10**12),
        "configs/not_an_object.json": b"[1, 2, 3]",
        "configs/deep.json": nested(100_000).encode(),
        "safetensors/huge_header_length.safetensors": safetensors_header({}, length=2**62),
        "safetensors/offsets_past_the_end.safetensors": safetensors_header(
            {f"{Q}.lora_A.weight": {"dtype": "F32", "shape": [1, HIDDEN], "data_offsets": [0, 10**12]}}),
        "safetensors/huge_shape.safetensors": safetensors_header(
            {f"{Q}.lora_A.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, tail=b"\0" * 4),
        "safetensors/embed_tokens.safetensors": embed_lora(),
        "safetensors/many_tensors.tar.xz": many_tensors(),
        "configs/embed_tokens.json": good_config(target_modules=["embed_tokens"]),
        "good/adapter_config.json": good_config(),
        "good/adapter_model.safetensors": good_weights(),
    }
    for name, data in files.items():
        (HERE / name).parent.mkdir(parents=True, exist_ok=True)
        (HERE / name).write_bytes(data)
    cfg, w = "good/adapter_config.json", "good/adapter_model.safetensors"
    uploads = [
        ("a bzip2 tar of 200,000 headers", {"a.tar.bz2": "archives/headers.tar.bz2"}, 413),
        ("a bzip2 tar whose one member unpacks to 400 MB of zeros", {"a.tar.bz2": "archives/zeros.tar.bz2"}, 413),
        ("a zip of 1,000 entries", {"a.zip": "archives/many.zip"}, 413),
        ("a zip whose weights inflate 1000-fold", {"a.zip": "archives/zeros.zip"}, 413),
        ("a .tar.gz that is not one", {"a.tar.gz": "archives/not_an_archive.tar.gz"}, 400),
        ("a pattern that takes exponential time in a backtracking regex engine (served: RE2 is linear)",
         {"adapter_config.json": "configs/catastrophic_pattern.json", "adapter_model.safetensors": w}, 201),
        ("a pattern no regex engine compiles", {"adapter_config.json": "configs/invalid_pattern.json", "adapter_model.safetensors": w}, 400),
        ("a 10,000-character pattern", {"adapter_config.json": "configs/long_pattern.json", "adapter_model.safetensors": w}, 400),
        ("a string where a rank_pattern value must be an integer",
         {"adapter_config.json": "configs/string_rank.json", "adapter_model.safetensors": w}, 400),
        ("lora_alpha NaN", {"adapter_config.json": "configs/nan_alpha.json", "adapter_model.safetensors": w}, 400),
        ("r = 10^12", {"adapter_config.json": "configs/huge_rank.json", "adapter_model.safetensors": w}, 400),
        ("a config that is a JSON list", {"adapter_config.json": "configs/not_an_object.json", "adapter_model.safetensors": w}, 400),
        ("a config nested 100,000 deep", {"adapter_config.json": "configs/deep.json", "adapter_model.safetensors": w}, 400),
        ("a safetensors header length of 2^62", {"adapter_config.json": cfg,
                                                  "adapter_model.safetensors": "safetensors/huge_header_length.safetensors"}, 400),
        ("tensor offsets past the end of the file", {"adapter_config.json": cfg,
                                                      "adapter_model.safetensors": "safetensors/offsets_past_the_end.safetensors"}, 400),
        ("a tensor shape of 2^40 x 2^40", {"adapter_config.json": cfg, "adapter_model.safetensors": "safetensors/huge_shape.safetensors"}, 400),
        ("a LoRA on embed_tokens shaped like a linear layer",
         {"adapter_config.json": "configs/embed_tokens.json", "adapter_model.safetensors": "safetensors/embed_tokens.safetensors"}, 400),
        ("a weights file of 100,000 one-value tensors", {"a.tar.xz": "safetensors/many_tensors.tar.xz"}, 400),
    ]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    bodies = [
        ("a version made of non-ASCII digits", "GET", "/v1/adapters/sentiment@%C2%B2", None, 400),
        ("a name with a trailing newline", "POST", "/v1/chat/completions", {**chat, "model": "auto\n"}, 404),
        ("a NaN merge parameter", "POST", "/v1/chat/completions",
         {**chat, "model": "BASE", "composition": {"skills": ["a", "b"], "method": "ties", "params": {"density": "nan"}}}, 400),
        ("a million k-means restarts", "POST", "/v1/chat/completions",
         {**chat, "model": "BASE", "composition": {"skills": ["a", "b"], "method": "lego", "rank": 4, "params": {"n_init": 10**6}}}, 400),
        ("a merge seed of 2^64", "POST", "/v1/chat/completions",
         {**chat, "model": "BASE", "composition": {"skills": ["a", "b"], "method": "dare_ties", "params": {"seed": 2**64}}}, 400),
        ("a body nested 100,000 deep", "POST", "/v1/chat/completions", nested(100_000), 400),
        ("a body that is a JSON string", "POST", "/v1/chat/completions", "\"hello\"", 400),
        ("an unknown field", "POST", "/v1/chat/completions", {**chat, "model": "BASE", "temprature": 0}, 400),
        ("a list where vLLM's validator expects an object (schemathesis found it: a 500 from vLLM's validator)",
         "POST", "/v1/chat/completions", {**chat, "model": "BASE", "structured_outputs": [1]}, 400),
    ]
    manifest = {
        "uploads": [{"what": what, "files": files_, "status": status} for what, files_, status in uploads],
        "bodies": [{"what": what, "method": method, "path": path, "body": body, "status": status}
                   for what, method, path, body, status in bodies],
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {len(files)} files and manifest.json ({total:,} bytes in all)")


if __name__ == "__main__":
    main()

"""Reads and writes around the page cache (io/direct.py): the same bytes as plain I/O, at any offset and length,
and a clean fallback where the file system refuses ``O_DIRECT`` (at open, or only at the first transfer)."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_convert.io import direct, sources
from lora_convert.io.reader import open_checkpoint
from lora_convert.io.writer import PlannedTensor, SafetensorsWriter

# sizes that straddle the alignment and the staging buffer: a tail, a header-sized piece, a whole buffer and more
PIECES = [1, 7, 4095, 4096, 4097, 100_000, (1 << 16) + 3, (1 << 16) * 3 + 11]


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _write_staged(path: Path, pieces: list[bytes], stage: int) -> direct.StagedFile:
    f = direct.StagedFile(path, stage_bytes=stage)
    try:
        for p in pieces:
            f.write(p)
        f.sync()
    finally:
        f.close()
    return f


@pytest.mark.parametrize("stage", [4096, 1 << 16])
def test_staged_file_writes_every_byte_directly(tmp_path: Path, stage: int) -> None:
    pieces = [_payload(n, i) for i, n in enumerate(PIECES)]
    f = _write_staged(tmp_path / "out.bin", pieces, stage)
    data = (tmp_path / "out.bin").read_bytes()
    assert data == b"".join(pieces)  # the padded tail was cut back: size and bytes exact
    assert os.stat(tmp_path / "out.bin").st_size == sum(PIECES)
    if direct.O_DIRECT and not direct.DISABLED:
        assert f.direct, "this test's file system (tmp_path) takes O_DIRECT: the direct path must have been used"


def test_staged_file_falls_back_when_a_direct_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems take ``O_DIRECT`` at open and refuse it at the first write (EINVAL): written plainly."""
    real_write = os.write
    refused = []

    def write(fd: int, data: object) -> int:
        if direct.O_DIRECT and _is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(direct.os, "write", write)
    pieces = [_payload(n, i) for i, n in enumerate(PIECES)]
    f = _write_staged(tmp_path / "out.bin", pieces, 4096)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
    assert not f.direct
    if direct.O_DIRECT and not direct.DISABLED:
        assert refused, "the direct write was never tried"


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT)


def test_staged_file_without_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "O_DIRECT", 0)  # a platform without it (macOS)
    pieces = [_payload(n, i) for i, n in enumerate(PIECES)]
    f = _write_staged(tmp_path / "out.bin", pieces, 4096)
    assert not f.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # odd row widths: the tensors' data offsets in the file are not aligned to anything
    return {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(700, 333, generator=g),
        "c": torch.randn(1025, 257, generator=g).to(torch.float16),
        "d": torch.randint(0, 9, (31,), generator=g, dtype=torch.int64),
    }


def test_writer_output_is_what_safetensors_reads(tmp_path: Path) -> None:
    ts = _tensors()
    w = SafetensorsWriter(tmp_path, [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in ts.items()])
    for n, t in ts.items():
        for block in t.split(97) if t.dim() else [t]:
            w.write(n, block)
    assert w.close() == ["model.safetensors"]
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(ts)
    for n, t in ts.items():
        assert torch.equal(got[n], t), n


@pytest.mark.parametrize("refuse", ["none", "open", "read"])
def test_block_reads_match_plain_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: str) -> None:
    """Row blocks read through the direct reader equal the file's bytes at every offset; where the file system
    refuses O_DIRECT at open or at the first read, the same bytes come through the page cache."""
    ts = _tensors()
    save_file(ts, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(sources, "DIRECT_MIN", 1)  # every read large enough to go direct
    monkeypatch.setattr(direct, "cached_pages", lambda *a: 0)  # never served from the cache: the disk path
    real_open, real_preadv = os.open, os.preadv
    direct_fds: set[int] = set()

    def fake_open(path: object, flags: int, *a: object) -> int:
        if refuse == "open" and flags & direct.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *a)  # type: ignore[arg-type]
        if flags & direct.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_preadv(fd: int, bufs: list, offset: int, *a: object) -> int:
        if refuse == "read" and fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, offset, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(sources.os, "open", fake_open)
    monkeypatch.setattr(direct.os, "preadv", fake_preadv)
    ck = open_checkpoint(tmp_path / "model.safetensors")
    try:
        for name, t in ts.items():
            rows = t.shape[0]
            for step in (1, 7, 64, rows):
                got = torch.cat([ck.read_rows(name, s, s + step) for s in range(0, rows, step)])
                assert torch.equal(got, t), (name, step)
            assert torch.equal(ck.read(name), t)
        if direct.O_DIRECT and not direct.DISABLED and refuse == "none":
            assert direct_fds, "the direct path was never opened"
    finally:
        ck.close()


def test_cached_window_is_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A window that ``cachestat`` reports fully cached is read through the plain descriptor (no disk read)."""
    data = _payload(3 * direct.ALIGN + 5)
    (tmp_path / "f").write_bytes(data)
    plain = os.open(tmp_path / "f", os.O_RDONLY)
    used: list[int] = []
    real = os.preadv

    def spy(fd: int, bufs: list, offset: int, *a: object) -> int:
        used.append(fd)
        return real(fd, bufs, offset, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(direct.os, "preadv", spy)
    monkeypatch.setattr(direct, "cached_pages", lambda fd, off, n: n // 4096 + 1)
    r = direct.DirectReader(plain, -1)  # no direct descriptor at all: reading it would fail
    try:
        buf = bytearray(len(data) - 10)
        assert r.read_into(memoryview(buf), 10) == len(buf)
        assert bytes(buf) == data[10:]
        assert used and set(used) == {plain}
        short = bytearray(100)
        assert r.read_into(memoryview(short), len(data) - 20) == 20  # the end of the file: a short count
    finally:
        r.close()
        os.close(plain)


def test_cachestat_counts_pages(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(_payload(8 * 4096))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        os.pread(fd, 8 * 4096, 0)
        n = direct.cached_pages(fd, 0, 8 * 4096)
        if n is None:
            pytest.skip("no cachestat on this kernel (Linux < 6.5): every window goes to the disk")
        assert n == 8
    finally:
        os.close(fd)

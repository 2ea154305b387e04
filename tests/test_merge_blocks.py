"""The merge's large row blocks (issue 26): read straight from the disk into their pooled slot, computed in turns
by the worker and a side thread, pooled under a byte budget — same bytes as the one-thread, copy-through path."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import llama, peft_wrap

import lora_convert as lc
from lora_convert import pipeline as pl
from lora_convert.errors import CheckpointError
from lora_convert.io import direct, sources
from lora_convert.io.reader import open_checkpoint
from lora_convert.routes.merge_engine import KeyOps, block_plan


def _file(tmp_path: Path) -> dict[str, torch.Tensor]:
    """A small tensor first, so the large one starts off the 4096-byte alignment."""
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(3, 5, generator=g), "w": torch.randn(1536, 1024, generator=g).to(torch.bfloat16)}
    save_file(ts, str(tmp_path / "model.safetensors"))
    return ts


@pytest.mark.parametrize("cached", [False, True])
def test_block_lands_in_the_slot_with_no_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    """A direct read of the aligned range around the block puts it inside the slot (or a plain read from the page
    cache puts it at the same place): the block returned is a view of the slot, with the file's bytes."""
    ts = _file(tmp_path)
    monkeypatch.setattr(direct, "cached_pages", lambda fd, off, n: n // 4096 + 1 if cached else 0)
    ck = open_checkpoint(tmp_path / "model.safetensors")
    try:
        info = ck.info("w")
        assert (info.offset + 100 * 2048) % direct.ALIGN, "the test block must start off the alignment"
        for start, stop in [(100, 1100), (0, 1536), (1000, 1536)]:
            nbytes = (stop - start) * 2048
            slot = torch.empty(nbytes + 2 * direct.ALIGN, dtype=torch.uint8)
            got = ck.read_block("w", start, stop, slot)
            assert torch.equal(got, ts["w"][start:stop]), (start, stop)
            lo, hi = slot.data_ptr(), slot.data_ptr() + slot.numel()
            assert lo <= got.data_ptr() and got.data_ptr() + nbytes <= hi, "read in place, not copied"
            tight = torch.empty(nbytes, dtype=torch.uint8)  # no room around it: read through the window instead
            got = ck.read_block("w", start, stop, tight)
            assert torch.equal(got, ts["w"][start:stop]) and got.data_ptr() == tight.data_ptr()
    finally:
        ck.close()


def test_block_read_of_a_truncated_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _file(tmp_path)
    monkeypatch.setattr(direct, "cached_pages", lambda *a: 0)
    ck = open_checkpoint(tmp_path / "model.safetensors")
    try:
        size = os.path.getsize(tmp_path / "model.safetensors")
        os.truncate(tmp_path / "model.safetensors", size - 5000)
        slot = torch.empty(1536 * 2048 + 2 * direct.ALIGN, dtype=torch.uint8)
        with pytest.raises(CheckpointError, match="file ended") as exc:
            ck.read_block("w", 0, 1536, slot)
        assert exc.value.tensor == "w"
    finally:
        ck.close()


def test_block_read_falls_back_where_direct_reads_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ts = _file(tmp_path)
    assert sources.DIRECT_MIN <= 1536 * 2048, "the block must be large enough to go direct"
    monkeypatch.setattr(direct, "cached_pages", lambda *a: 0)
    monkeypatch.setattr(direct, "DISABLED", True)
    ck = open_checkpoint(tmp_path / "model.safetensors")
    try:
        slot = torch.empty(1536 * 2048 + 2 * direct.ALIGN, dtype=torch.uint8)
        got = ck.read_block("w", 0, 1536, slot)
        assert torch.equal(got, ts["w"]) and got.data_ptr() == slot.data_ptr()  # plain read at the slot's start
    finally:
        ck.close()


def test_pool_holds_a_byte_budget() -> None:
    """Under one budget, small blocks get more buffers than large ones; a larger block drops free small buffers
    to make room; with everything held, a request waits (and unwinds once the pipeline is closed)."""
    closed = threading.Event()
    mb = 1 << 20
    pool = pl._Pool(4 * mb, 4 * mb, closed)
    small = [pool.take((mb,), torch.uint8) for _ in range(4)]
    assert len({t.data_ptr() for t in small}) == 4
    for t in small[:3]:
        pool.put(pool.owns[t.data_ptr()])
    big = pool.take((3 * mb,), torch.uint8)  # three free 1 MB buffers dropped for it
    assert pool._held == 4 * mb and len(pool.owns) == 2
    assert big.data_ptr() != small[3].data_ptr()
    closed.set()
    with pytest.raises(pl._Stopped):
        pool.take((mb,), torch.uint8)  # the budget is spent and nothing comes back
    assert pool.take((5 * mb,), torch.uint8).numel() == 5 * mb  # larger than any pooled buffer: a fresh one


def test_merge_blocks_come_in_even_counts(tmp_path: Path) -> None:
    """Equal blocks of at most the limit, an even count of them where the rows allow, covering every row once."""
    save_file(
        {"w": torch.zeros(1000, 3000, dtype=torch.bfloat16), "v": torch.zeros(7, 5)}, str(tmp_path / "m.safetensors")
    )
    ck = open_checkpoint(tmp_path / "m.safetensors")
    try:
        for key, limit, even in [("w", pl.TILE_BYTES, 2), ("w", 1 << 20, 6), ("v", pl.TILE_BYTES, 2), ("v", 24, 0)]:
            shape = tuple(ck.info(key).shape)
            plan = block_plan(KeyOps((ck, key)), shape, ck.info(key).dtype, limit)
            assert len(plan) == (even or shape[0]), (key, limit, len(plan))  # 7 rows of 20 bytes: one a block
            assert [r.start for r in plan] == sorted({r.start for r in plan})
            assert plan[0].start == 0 and plan[-1].stop == shape[0]
            assert all(a.stop == b.start for a, b in zip(plan, plan[1:], strict=False))
            assert all(ck.span(key, r.start, r.stop)[1] <= max(limit, ck.span(key, 0, 1)[1]) for r in plan)
    finally:
        ck.close()


def test_side_thread_merge_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other block computed on the side thread gives the same file as one thread computing them all, and
    equals bf16(fp32(W) + s·B@A) rounded once."""
    base = llama(dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    pm = peft_wrap(base, r=8, lora_alpha=16, target_modules=["q_proj", "down_proj", "embed_tokens"])
    pm.save_pretrained(str(tmp_path / "adapter"))
    submitted = []
    real = pl.ThreadPoolExecutor

    class Counting(real):  # type: ignore[misc, valid-type]
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            submitted.append(fn)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(pl, "ThreadPoolExecutor", Counting)
    monkeypatch.setattr(pl.os, "cpu_count", lambda: 2)
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "two")
    assert submitted, "the side thread computed no block"
    monkeypatch.setattr(pl.os, "cpu_count", lambda: 1)
    n = len(submitted)
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "one")
    assert len(submitted) == n, "one core: no side thread"
    two = (tmp_path / "two" / "model.safetensors").read_bytes()
    assert two == (tmp_path / "one" / "model.safetensors").read_bytes()
    got, w = (
        load_file(str(tmp_path / "two" / "model.safetensors")),
        load_file(str(tmp_path / "base" / "model.safetensors")),
    )
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = "model.layers.0.mlp.down_proj"
    a, b = ad[f"base_model.model.{key}.lora_A.weight"].float(), ad[f"base_model.model.{key}.lora_B.weight"].float()
    want = torch.addmm(w[f"{key}.weight"].float(), b, a, alpha=2.0).to(torch.bfloat16)
    assert torch.equal(got[f"{key}.weight"], want)


@pytest.mark.parametrize("phase", [0, 1000])
def test_placed_block_goes_to_the_disk_from_where_it_lies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: int
) -> None:
    """A block at the file position's alignment: its aligned middle is one write straight from its memory (the
    staging buffer takes only the partial pages); a block off the alignment is staged.  Same bytes either way."""
    lens: list[int] = []
    real = os.write

    def spy(fd: int, data: memoryview) -> int:
        lens.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(direct.os, "write", spy)
    g = torch.Generator().manual_seed(1)
    head = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=g)
    block = torch.randint(0, 256, (300_000,), dtype=torch.uint8, generator=g)
    f = direct.StagedFile(tmp_path / "f", stage_bytes=16 * direct.ALIGN)
    try:
        f.write(head.numpy().data)
        slot = torch.empty(len(block) + direct.ALIGN, dtype=torch.uint8)
        k = (1000 + phase - slot.data_ptr()) % direct.ALIGN  # phase 0: at the file position's alignment
        placed = slot[k : k + len(block)]
        placed.copy_(block)
        f.write_at(placed.numpy().data, placed.data_ptr())
        f.sync()
    finally:
        f.close()
    assert (tmp_path / "f").read_bytes() == bytes(head.numpy()) + bytes(block.numpy())
    if direct.O_DIRECT and not direct.DISABLED:
        straight = (len(block) - (direct.ALIGN - 1000)) // direct.ALIGN * direct.ALIGN
        assert (straight in lens) == (phase == 0), lens
        assert max(lens) <= 16 * direct.ALIGN or phase == 0

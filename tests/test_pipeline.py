"""The three-stage pipeline (reader thread, worker thread, the caller writing): blocks in the declared
order, buffers recycled without corrupting what is written, errors from any stage surfacing once, in the
caller's thread, and no thread left behind."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors.torch import load_file
from tiny import llama, peft_wrap

import lora_convert as lc
from lora_convert import lora_math
from lora_convert import pipeline as pl
from lora_convert.errors import AdapterError
from lora_convert.io.writer import SafetensorsSink


def _row_job(name: str, rows: int, cols: int, step: int, seed: int) -> tuple[pl.Job, torch.Tensor]:
    full = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))

    def blocks(buf: pl.Buffers):
        for s in range(0, rows, step):
            n = min(step, rows - s)
            yield buf.out((n, cols), torch.float32).copy_(full[s : s + n])

    return pl.Job(name, torch.float32, (rows, cols), blocks), full


def _producers() -> int:
    return sum(t.name.startswith("lora-convert-") for t in threading.enumerate())


def test_many_blocks_through_a_small_pool(tmp_path, monkeypatch):
    """More blocks than pool slots, and blocks of both pooled and oversized (fresh) kinds: every byte
    written must be the block's, i.e. no slot is reused before the writer is done with it."""
    monkeypatch.setattr(pl, "TILE_BYTES", 4096)
    jobs, want = [], {}
    for i, (rows, cols, step) in enumerate([(97, 8, 3), (40, 33, 31), (5, 7, 5), (64, 16, 1)]):
        job, full = _row_job(f"t{i}", rows, cols, step, i)
        jobs.append(job)
        want[job.name] = full
    pl.execute(jobs, SafetensorsSink(tmp_path))
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert _producers() == 0


def test_producer_error_reaches_the_caller_with_its_type(tmp_path):
    def blocks(buf):
        yield buf.out((2, 2), torch.float32).zero_()
        raise AdapterError("boom", tensor="t0")

    jobs = [pl.Job("t0", torch.float32, (4, 2), blocks)] + [_row_job(f"x{i}", 50, 50, 1, i)[0] for i in range(3)]
    with pytest.raises(AdapterError, match="boom"):
        pl.execute(jobs, SafetensorsSink(tmp_path))
    assert _producers() == 0


def test_writer_error_stops_the_producer(tmp_path):
    """A block that contradicts the plan fails in the writer; the producer, blocked on a full queue
    or an empty pool, must be told to stop and joined."""

    def bad(buf):
        yield buf.out((3, 3), torch.float16)  # planned float32

    jobs = [_row_job("a", 300, 64, 1, 0)[0], pl.Job("b", torch.float32, (3, 3), bad), _row_job("c", 300, 64, 1, 1)[0]]
    with pytest.raises(ValueError, match="dtype"):
        pl.execute(jobs, SafetensorsSink(tmp_path))
    assert _producers() == 0


def test_merge_is_the_same_whatever_the_block_size(tmp_path, monkeypatch):
    """Blocks of one row (many pool round trips, DoRA's two passes) give the files of the default
    blocking, up to fp32 summation order (a one-row GEMM may take another kernel): a recycled slot
    written too early would show up as whole rows of wrong values, far outside this tolerance."""
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "embed_tokens", "lm_head"])
    pm.save_pretrained(str(tmp_path / "adapter"))
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "default")
    real = lora_math.block_rows
    monkeypatch.setattr(lora_math, "block_rows", lambda rows, cols, budget=0, **kw: real(rows, cols, 1, **kw))
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "rows")
    a = load_file(str(tmp_path / "default" / "model.safetensors"))
    b = load_file(str(tmp_path / "rows" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _saved(tmp_path, **tensors):
    from safetensors.torch import save_file

    from lora_convert.io.reader import open_checkpoint

    save_file(tensors, str(tmp_path / "model.safetensors"))
    return open_checkpoint(tmp_path)


def _reading_job(ck, key, name, step):
    rows = ck.info(key).shape[0]

    def reads():
        return [pl.Read(ck, key, s, min(s + step, rows)) for s in range(0, rows, step)]

    def blocks(buf):
        for r in reads():
            yield buf.read(r)

    return pl.Job(name, ck.info(key).dtype, ck.info(key).shape, blocks, reads=reads)


def test_reader_stage_feeds_blocks_in_declared_order(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "TILE_BYTES", 256)  # a tiny read pool: the reader must wait for slots
    monkeypatch.setattr(pl, "READ_SLOTS", 2)
    pool = pl.Buffers()._read
    assert pool.budget == 2 * pool.largest  # READ_SLOTS of the largest blocks
    x = torch.randn(300, 8)
    y = torch.arange(1000, dtype=torch.int64).reshape(100, 10)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    ck = _saved(tmp_path / "in", x=x, y=y)
    pl.execute([_reading_job(ck, "x", "x", 7), _reading_job(ck, "y", "y", 1)], SafetensorsSink(tmp_path / "out"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["x"], x) and torch.equal(got["y"], y)
    assert _producers() == 0


def _one_tensor(tmp_path):
    """A 64x4 checkpoint in tmp_path/in and two empty output folders o1, o2."""
    for d in ("in", "o1", "o2"):
        (tmp_path / d).mkdir()
    return _saved(tmp_path / "in", x=torch.randn(64, 4))


def _misdeclared(ck, edit):
    """A job that reads x in 8 blocks but declares ``edit(the true plan)``."""
    job = _reading_job(ck, "x", "x", 8)
    true_plan = job.reads
    job.reads = lambda: edit(true_plan())
    return job


def test_read_error_and_order_mismatch_surface_in_the_caller(tmp_path):
    ck = _one_tensor(tmp_path)
    job = _misdeclared(ck, lambda plan: plan[::-1])  # declares one order, reads in another
    with pytest.raises(RuntimeError, match="out of declared order"):
        pl.execute([job], SafetensorsSink(tmp_path / "o1"))
    assert _producers() == 0
    # the file shrinks under us after opening: the reader's CheckpointError reaches the caller
    from lora_convert.errors import CheckpointError

    f = tmp_path / "in" / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="file ended"):
        pl.execute([_reading_job(ck, "x", "x", 8)], SafetensorsSink(tmp_path / "o2"))
    assert _producers() == 0


def test_reading_more_or_fewer_blocks_than_declared_is_an_error_not_a_hang(tmp_path):
    ck = _one_tensor(tmp_path)
    more = _misdeclared(ck, lambda plan: plan[:-1])  # reads all 8 blocks, declares 7
    with pytest.raises(RuntimeError, match="beyond the declared plan"):
        pl.execute([more], SafetensorsSink(tmp_path / "o1"))
    assert _producers() == 0
    fewer = _misdeclared(ck, lambda plan: plan + [pl.Read(ck, "x", 0, 8)])  # declares one block it never reads
    with pytest.raises(RuntimeError, match="never consumed"):
        pl.execute([fewer], SafetensorsSink(tmp_path / "o2"))
    assert _producers() == 0


def test_copy_of_a_tensor_with_huge_rows_moves_in_bounded_pieces(tmp_path):
    """Fused MoE experts (E, out, in): one row along dim 0 can be hundreds of MB.  A copy is a byte
    range, so it is declared and moved in COPY_BLOCK pieces whatever the shape."""
    from lora_convert.routes.common import COPY_BLOCK
    from lora_convert.routes.common import copy_job as _copy_job

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    experts = torch.randn(3, 700, 600)  # 1.68 MB per expert, above COPY_BLOCK
    ck = _saved(tmp_path / "in", experts=experts, bias=torch.randn(5))
    jobs = [_copy_job(ck, "experts", "experts"), _copy_job(ck, "bias", "bias", torch.bfloat16)]
    sizes = [(r.stop - r.start) * 4 for r in jobs[0].reads()]
    assert max(sizes) <= COPY_BLOCK and sum(sizes) == experts.numel() * 4
    pl.execute(jobs, SafetensorsSink(tmp_path / "out"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["experts"], experts)
    assert got["bias"].dtype == torch.bfloat16 and torch.equal(got["bias"], ck.read("bias").to(torch.bfloat16))

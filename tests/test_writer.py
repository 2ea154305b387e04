"""The streaming writer: sharding, index, metadata, and bit-exact reloads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny import llama, logits

from lora_convert.io.reader import open_checkpoint
from lora_convert.io.writer import PlannedTensor, SafetensorsWriter, parse_size


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError):
        parse_size("lots")


def test_sharded_write_streams_rows_and_loads_bit_exact(tmp_path):
    model = llama(dtype=torch.bfloat16)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    w = SafetensorsWriter(tmp_path, plan, max_shard_size="10KB")
    for k, v in sd.items():
        for s in range(0, v.shape[0], 7):  # in row blocks, as the merge writes
            w.write(k, v[s : s + 7])
    files = w.close()
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    got = {}
    for f in files:
        with safe_open(str(tmp_path / f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                got[k] = fh.get_tensor(k)
                assert index["weight_map"][k] == f
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    ck = open_checkpoint(tmp_path)
    assert ck.layout == "sharded-safetensors" and all(torch.equal(ck.read(k), sd[k]) for k in sd)
    # transformers loads the folder
    model.config.save_pretrained(str(tmp_path))
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert torch.equal(logits(again), logits(model))


def test_writer_refuses_out_of_plan(tmp_path):
    w = SafetensorsWriter(tmp_path, [PlannedTensor("a", torch.float32, (2,)), PlannedTensor("b", torch.float32, (1,))])
    with pytest.raises(ValueError, match="out of plan order"):
        w.write("b", torch.zeros(1))
    with pytest.raises(ValueError, match="dtype"):
        w.write("a", torch.zeros(2, dtype=torch.float16))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="planned but not written"):
        w.close()

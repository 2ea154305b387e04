"""``merge --dry-run``'s factor bytes for LoHa, LoKr and full-diff modules: every factor the algorithm reads
(LoHa's four and its Tucker cores, LoKr's w1/w2 or their halves and core, the diff and its bias), each once,
equal to the bytes the real merge reads whole from the adapter."""

from __future__ import annotations

import pytest
import torch
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from peft import LoHaConfig, LoKrConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import llama, unet

import lora_convert as lc
from lora_convert.io.reader import Checkpoint

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
SPECS = {  # every stored layout of each algorithm
    f"{ATTN}.attn1.to_q": ("loha", dict(lora_dim=2, alpha=1)),
    "down_blocks.0.resnets.0.conv1": ("loha", dict(lora_dim=2, alpha=3, use_tucker=True)),  # hada_t1/t2
    f"{ATTN}.ff.net.0.proj": ("lokr", dict(lora_dim=1, factor=4, decompose_both=True)),  # w1_a/b, w2_a/b
    f"{ATTN}.attn2.to_k": ("lokr", dict(lora_dim=1, alpha=3, factor=2)),  # w1 whole, w2_a/w2_b
    "down_blocks.0.downsamplers.0.conv": ("lokr", dict(lora_dim=2, alpha=3, factor=2)),  # both whole
    # Tucker: lokr_t2 with w2_a/b, and w1_a/b
    "up_blocks.0.resnets.0.conv2": ("lokr", dict(lora_dim=1, factor=-1, decompose_both=True, use_tucker=True)),
    "down_blocks.0.resnets.0.time_emb_proj": ("full", {}),  # diff and diff_b
}


def _lycoris_file(model, path):
    torch.manual_seed(3)
    named = dict(model.named_modules())
    sd = {}
    for mod, (algo, kw) in SPECS.items():
        name = "lora_unet_" + mod.replace(".", "_")
        if algo == "full":
            sd[f"{name}.diff"] = torch.randn_like(named[mod].weight) * 0.1
            sd[f"{name}.diff_b"] = torch.randn(named[mod].weight.shape[0]) * 0.1
            continue
        m = (LohaModule if algo == "loha" else LokrModule)(name, named[mod], 1.0, **kw)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n != "scalar":
                    p.normal_(0, 0.3)
        sd.update({f"{name}.{k}": v.detach().clone().contiguous() for k, v in m.custom_state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return sd


def _read_whole(monkeypatch, root):
    """Bytes of each tensor the real run reads whole (``Checkpoint.read``) from the checkpoint at ``root``."""
    seen: dict[str, int] = {}
    real = Checkpoint.read

    def read(self, name):
        t = real(self, name)
        if self.root == root:
            seen[name] = t.numel() * t.element_size()
        return t

    monkeypatch.setattr(Checkpoint, "read", read)
    return seen


def test_lycoris_dry_run_counts_every_factor_the_merge_reads(tmp_path, monkeypatch):
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    sd = _lycoris_file(base, tmp_path / "k" / "lyco.safetensors")
    roles = {k.rsplit(".", 1)[1] for k in sd}
    assert {"hada_t1", "hada_t2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff_b"} <= roles
    want = sum(v.numel() * v.element_size() for k, v in sd.items() if not k.endswith(".alpha"))
    dry = lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "m", dry_run=True)
    assert dry.factor_bytes == want
    read = _read_whole(monkeypatch, (tmp_path / "k").resolve())
    lc.merge(tmp_path / "k", base=tmp_path / "unet", output=tmp_path / "m")
    assert sum(read.values()) == want, sorted(read)


@pytest.mark.parametrize(
    "config",
    [
        LoHaConfig(r=2, target_modules=["q_proj", "down_proj"]),
        LoKrConfig(r=2, target_modules=["q_proj", "down_proj"], decompose_both=True),
    ],
    ids=["loha", "lokr"],
)
def test_peft_loha_lokr_dry_run_counts_every_factor_the_merge_reads(tmp_path, monkeypatch, config):
    llama().save_pretrained(str(tmp_path / "base"))
    pm = get_peft_model(llama(), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "hada" in n or "lokr" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    sd = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    want = sum(v.numel() * v.element_size() for v in sd.values())
    dry = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m", dry_run=True)
    assert dry.factor_bytes == want
    read = _read_whole(monkeypatch, (tmp_path / "adapter").resolve())
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m")
    assert sum(read.values()) == want, sorted(read)

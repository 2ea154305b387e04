"""lora_convert.io.hub against the fake Hub of tests/hub_server.py (fully offline, 127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError
from safetensors.torch import save_file

from lora_convert.errors import CheckpointError, HubError
from lora_convert.io.hub import (
    PushResult,
    check_complete_output,
    is_repo_id,
    parse_repo_ref,
    push_folder,
    resolve_checkpoint,
)

README = "---\nlibrary_name: peft\nbase_model: org/base\n---\n# LoRA\n\nConverted by lora-convert.\n"


def make_output(folder: Path, *, seed: int = 0, rank: int = 4) -> dict[str, bytes]:
    """A small but complete PEFT adapter folder; returns {relative path: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, 32, generator=g),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, rank, generator=g),
        },
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"], "seed": seed})
    )
    (folder / "README.md").write_text(README + f"\nseed {seed}\n")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def read_tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the fixture itself


def test_fixture_points_huggingface_hub_at_the_fake_hub(hub_server):
    assert hf_constants.ENDPOINT == hub_server.endpoint.rstrip("/")
    assert hf_constants.HF_HUB_CACHE == str(hub_server.cache_dir)
    assert hf_constants.HF_HUB_OFFLINE is False and hf_constants.HF_HUB_DISABLE_XET is True
    assert huggingface_hub.hf_api.api.endpoint == hub_server.endpoint  # import-time singleton
    assert huggingface_hub.hf_hub_url("a/b", "x.json").startswith(hub_server.endpoint + "/a/b/resolve/")
    assert HfApi().whoami()["name"] == "test-user"
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as info:
        HfApi(token="hf_wrong").whoami()
    assert info.value.response.status_code == 401

    # anything else than 127.0.0.1 is refused before it leaves the process
    with pytest.raises(RuntimeError, match="only the fake Hub"):
        huggingface_hub.utils.get_session().get("https://huggingface.co/api/models/gpt2")
    assert hub_server.foreign_requests == ["https://huggingface.co/api/models/gpt2"]
    hub_server.foreign_requests.clear()

    hub_server.set_offline()
    assert huggingface_hub.constants.is_offline_mode()
    with pytest.raises(OfflineModeIsEnabled):
        HfApi().model_info("a/b")


def test_lfs_put_rejects_content_that_does_not_match_the_oid(hub_server):
    hub_server.seed("org/lfs", {"config.json": b"{}"})
    good = b"x" * 100
    oid = hashlib.sha256(good).hexdigest()

    def call(method, url, body=None, auth=True):
        req = urllib.request.Request(url, data=body, method=method)
        if auth:
            req.add_header("Authorization", f"Bearer {hub_server.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(good)}]}).encode()
    assert call("POST", f"{hub_server.endpoint}/org/lfs.git/info/lfs/objects/batch", batch, auth=False)[0] == 401
    status, body = call("POST", f"{hub_server.endpoint}/org/lfs.git/info/lfs/objects/batch", batch)
    assert status == 200
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    assert call("PUT", href, b"y" * 100, auth=False)[0] == 400  # right size, wrong sha256
    assert call("PUT", href, good[:50], auth=False)[0] == 400  # wrong size
    assert call("PUT", href.replace("sig=", "sig=0"), good, auth=False)[0] == 403  # forged signature
    assert call("PUT", href, good, auth=False)[0] == 200
    status, body = call("POST", f"{hub_server.endpoint}/org/lfs.git/info/lfs/objects/batch", batch)
    assert "actions" not in json.loads(body)["objects"][0]  # already stored: nothing to upload
    # create on an existing repo answers 409 and still carries the url
    status, body = call(
        "POST",
        f"{hub_server.endpoint}/api/repos/create",
        json.dumps({"name": "lfs", "organization": "org", "type": "model"}).encode(),
    )
    assert status == 409 and json.loads(body)["url"] == f"{hub_server.endpoint}/org/lfs"


# --------------------------------------------------------------------------- repo ids


def test_repo_ids():
    assert is_repo_id("org/name") and is_repo_id("Org-1/my_model.v2")
    for bad in ("name", "org/", "/name", "a/b/c", "org/na--me", "org/na..me", "org/-name", "org/name.", "o rg/n", ""):
        assert not is_repo_id(bad), bad
    assert parse_repo_ref("org/name") == ("org/name", None)
    assert parse_repo_ref("org/name@dev") == ("org/name", "dev")
    assert parse_repo_ref("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for bad in ("org/name@", "a/b/c@main", "nope"):
        with pytest.raises(HubError):
            parse_repo_ref(bad)


# --------------------------------------------------------------------------- push + download


@pytest.mark.parametrize("private", [False, True])
def test_push_then_download_byte_for_byte(hub_server, tmp_path, private):
    sent = make_output(tmp_path / "out")
    result = push_folder(tmp_path / "out", "org/adapter", private=private, message="add adapter", progress=False)

    assert isinstance(result, PushResult)
    assert result.repo_id == "org/adapter" and result.revision == "main"
    assert "/commit/" in result.commit_url and result.commit_oid in result.commit_url
    assert result.files == sorted(sent)
    assert hub_server.head("org/adapter") == result.commit_oid
    assert hub_server.repo("org/adapter").private is private
    entry = hub_server.entry("org/adapter", "adapter_model.safetensors")
    assert entry.lfs, "safetensors must travel through git-LFS"
    assert any(r.method == "PUT" and r.path.startswith("/_lfs/") and r.status == 200 for r in hub_server.requests)
    assert not hub_server.entry("org/adapter", "adapter_config.json").lfs

    stored = hub_server.files("org/adapter")
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == sent

    folder = snapshot_download("org/adapter")
    assert Path(folder).is_relative_to(hub_server.cache_dir)
    got = read_tree(folder)
    assert set(got) == set(sent) | {".gitattributes"}
    for name, data in sent.items():
        assert got[name] == data, name

    if private:
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download("org/adapter", token=False, cache_dir=hub_server.hf_home / "anon")
        hub_server.set_token(None)
        with pytest.raises(HubError, match="org/adapter") as info:
            resolve_checkpoint("org/adapter")
        assert "HF_TOKEN" in str(info.value) and "\n" not in str(info.value)


def test_push_to_new_branch_keeps_main(hub_server, tmp_path):
    v1 = make_output(tmp_path / "v1", seed=1)
    first = push_folder(tmp_path / "v1", "org/branchy", progress=False)
    v2 = make_output(tmp_path / "v2", seed=2, rank=8)
    second = push_folder(tmp_path / "v2", "org/branchy", revision="dev", message="rank 8", progress=False)

    assert second.revision == "dev"
    assert hub_server.head("org/branchy", "dev") == second.commit_oid
    assert hub_server.head("org/branchy", "main") == first.commit_oid
    assert hub_server.history("org/branchy", "dev")[1] == first.commit_oid  # branched from main

    dev = read_tree(resolve_checkpoint("org/branchy@dev"))
    main = read_tree(resolve_checkpoint("org/branchy"))
    for name in v2:
        assert dev[name] == v2[name]
        assert main[name] == v1[name]

    # pushing again to the now existing branch adds a commit on it only
    v3 = make_output(tmp_path / "v3", seed=3)
    third = push_folder(tmp_path / "v3", "org/branchy", revision="dev", progress=False)
    assert hub_server.history("org/branchy", "dev")[:2] == [third.commit_oid, second.commit_oid]
    assert hub_server.head("org/branchy", "main") == first.commit_oid
    assert hub_server.files("org/branchy", "dev")["adapter_config.json"] == v3["adapter_config.json"]


def test_push_as_pull_request(hub_server, tmp_path):
    make_output(tmp_path / "v1", seed=1)
    first = push_folder(tmp_path / "v1", "org/pr", progress=False)
    v2 = make_output(tmp_path / "v2", seed=2)
    result = push_folder(tmp_path / "v2", "org/pr", create_pr=True, progress=False)
    assert result.revision == "refs/pr/1" and result.pr_url.endswith("/discussions/1")
    assert hub_server.head("org/pr") == first.commit_oid
    assert hub_server.files("org/pr", "refs/pr/1")["README.md"] == v2["README.md"]
    with pytest.raises(HubError, match="pull request against main"):
        push_folder(tmp_path / "v2", "org/pr", create_pr=True, revision="dev", progress=False)


# --------------------------------------------------------------------------- resolve_checkpoint


def test_resolve_checkpoint_downloads_only_needed_files_then_works_offline(hub_server):
    files = {
        "model.safetensors": b"\x00" * 64,
        "pytorch_model.bin": b"\x01" * 64,  # skipped: safetensors exist
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "tokenizer.model": b"\x02" * 16,
        "chat_template.jinja": b"{{ messages }}",
        "README.md": b"# base\n",
        "optimizer.pt": b"\x03" * 64,  # not needed
        "images/plot.png": b"\x89PNG",  # not needed
    }
    hub_server.seed("org/base", files)
    folder = resolve_checkpoint("org/base")
    assert folder.is_relative_to(hub_server.cache_dir)
    got = read_tree(folder)
    wanted = {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer.model",
        "chat_template.jinja",
        "README.md",
    }
    assert set(got) == wanted
    assert all(got[k] == files[k] for k in wanted)

    # offline: same folder from the cache, and not a single request to the server
    before = len(hub_server.requests)
    hub_server.set_offline()
    assert hf_constants.HF_HUB_OFFLINE is True
    assert resolve_checkpoint("org/base") == folder
    assert resolve_checkpoint("org/base@main") == folder
    assert len(hub_server.requests) == before
    with pytest.raises(HubError, match="org/other.*HF_HUB_OFFLINE"):
        resolve_checkpoint("org/other")
    assert len(hub_server.requests) == before


def test_resolve_checkpoint_takes_bin_when_no_safetensors(hub_server):
    hub_server.seed("org/old", {"pytorch_model.bin": b"\x01" * 32, "config.json": b"{}", "training_args.pt": b"x"})
    assert set(read_tree(resolve_checkpoint("org/old"))) == {"pytorch_model.bin", "config.json"}
    # explicit patterns win (same snapshot folder: it now holds the .pt file too)
    assert "training_args.pt" in read_tree(resolve_checkpoint("org/old", allow_patterns=["*.pt"]))


def test_resolve_checkpoint_local_path_wins(hub_server, tmp_path, monkeypatch):
    hub_server.seed("org/local", {"config.json": b"{}"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert resolve_checkpoint("org/local") == Path("org/local")
    assert hub_server.requests == []
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("./missing/folder")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("a/b/c.safetensors")
    assert hub_server.requests == []


def test_resolve_checkpoint_errors(hub_server):
    hub_server.seed("org/exists", {"config.json": b"{}"})
    with pytest.raises(HubError, match="'org/missing'.*not found"):
        resolve_checkpoint("org/missing")
    with pytest.raises(HubError, match="revision 'nope'.*revision not found"):
        resolve_checkpoint("org/exists@nope")
    hub_server.fail_next(r"^/api/models/org/exists", 503)
    with pytest.raises(HubError, match="HTTP 503"):
        resolve_checkpoint("org/exists")


def test_hub_down_uses_cache_and_unreachable_hub_is_a_hub_error(hub_server, tmp_path):
    hub_server.seed("org/cached", {"model.safetensors": b"\x00" * 8, "config.json": b"{}"})
    folder = resolve_checkpoint("org/cached")
    hub_server.fail_next(r".*", 500, count=100)  # Hub down: fall back to the cache, like huggingface_hub
    assert resolve_checkpoint("org/cached") == folder
    with pytest.raises(HubError, match="'org/fresh'.*HTTP 500"):
        resolve_checkpoint("org/fresh")
    hub_server.clear_faults()

    make_output(tmp_path / "out")
    hub_server.server.stop()  # nothing listens on the port any more
    with pytest.raises(HubError, match="'org/fresh'.*cannot be reached"):
        resolve_checkpoint("org/fresh")
    with pytest.raises(HubError, match="'org/fresh'.*cannot be reached"):
        push_folder(tmp_path / "out", "org/fresh", progress=False)
    assert resolve_checkpoint("org/cached") == folder


def test_offline_with_nothing_cached(hub_server):
    hub_server.seed("org/never", {"config.json": b"{}"})
    hub_server.set_offline()
    with pytest.raises(HubError, match="'org/never'.*offline") as info:
        resolve_checkpoint("org/never")
    assert "\n" not in str(info.value)
    with pytest.raises(HubError, match="offline"):
        resolve_checkpoint("org/never", allow_patterns=["*.json"])  # straight to snapshot_download
    assert hub_server.requests == []


# --------------------------------------------------------------------------- push failures


def test_push_without_token(hub_server, tmp_path):
    make_output(tmp_path / "out")
    hub_server.set_token(None)
    with pytest.raises(HubError, match="'org/x'.*no Hub token.*HF_TOKEN"):
        push_folder(tmp_path / "out", "org/x", progress=False)
    assert hub_server.requests == [] and hub_server.repo("org/x") is None


def test_push_with_wrong_token(hub_server, tmp_path):
    make_output(tmp_path / "out")
    with pytest.raises(HubError, match="'org/x'.*401") as info:
        push_folder(tmp_path / "out", "org/x", token="hf_not_the_right_one", progress=False)
    assert "hf_not_the_right_one" not in str(info.value)
    assert hub_server.repo("org/x") is None


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "org/bad--name", "org/sp ace", "org/"])
def test_push_invalid_repo_id(hub_server, tmp_path, repo_id):
    make_output(tmp_path / "out")
    with pytest.raises(HubError, match="not a valid Hub repo id"):
        push_folder(tmp_path / "out", repo_id, progress=False)
    assert hub_server.requests == []


@pytest.mark.parametrize(
    ("pattern", "status", "expect"),
    [
        (r"/preupload/", 401, "401"),
        (r"/preupload/", 403, "403"),
        (r"/preupload/", 404, "404"),
        (r"/commit/", 500, "500"),
        (r"/commit/", 403, "403"),
        (r"/commit/", 401, "401"),
        (r"\.git/info/lfs/objects/batch$", 403, "403"),
        (r"^/_lfs/", 403, "403"),
        (r"/validate-yaml$", 500, "500"),
        (r"/branch/", 403, "403"),
    ],
)
def test_push_fails_mid_upload_without_a_new_commit(hub_server, tmp_path, pattern, status, expect):
    make_output(tmp_path / "v1", seed=1)
    first = push_folder(tmp_path / "v1", "org/flaky", progress=False)
    make_output(tmp_path / "v2", seed=2)
    before = hub_server.history("org/flaky")
    hub_server.fail_next(pattern, status)
    revision = "dev" if "branch" in pattern else None
    with pytest.raises(HubError, match=f"'org/flaky'.*{expect}") as info:
        push_folder(tmp_path / "v2", "org/flaky", revision=revision, progress=False)
    text = str(info.value)
    assert "\n" not in text and hub_server.token not in text
    assert any(r.injected for r in hub_server.requests), "the fault was not hit"
    assert hub_server.history("org/flaky") == before and before[0] == first.commit_oid
    assert hub_server.head("org/flaky", "dev") is None
    # the next try (no fault) goes through
    again = push_folder(tmp_path / "v2", "org/flaky", revision=revision, progress=False)
    assert hub_server.head("org/flaky", revision or "main") == again.commit_oid != first.commit_oid


# --------------------------------------------------------------------------- completeness


def test_check_complete_output(tmp_path):
    good = tmp_path / "good"
    make_output(good)
    assert check_complete_output(good) == []

    leftover = tmp_path / "leftover"
    make_output(leftover)
    (leftover / "merged.tmp-lora-convert-1234").mkdir()
    (leftover / "merged.tmp-lora-convert-1234" / "model.safetensors").write_bytes(b"partial")
    assert any("leftover temporary folder merged.tmp-lora-convert-1234" in p for p in check_complete_output(leftover))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(sharded / "model-00001-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"},
            }
        )
    )
    assert check_complete_output(sharded) == [
        "model.safetensors.index.json names missing shard model-00002-of-00002.safetensors"
    ]

    truncated = tmp_path / "truncated"
    make_output(truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[:-10])
    assert any("truncated" in p for p in check_complete_output(truncated))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("hi")
    assert any("no weight files" in p for p in check_complete_output(empty))

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "adapter_config.json").write_text("{}")
    assert any("adapter_config.json without" in p for p in check_complete_output(config_only))
    assert check_complete_output(tmp_path / "nope") != []


def test_push_refuses_incomplete_output(hub_server, tmp_path):
    out = tmp_path / "out"
    make_output(out)
    (out / "adapter_model.safetensors.tmp-lora-convert-77").write_bytes(b"half")
    with pytest.raises(HubError, match="refusing to push.*leftover temporary"):
        push_folder(out, "org/partial", progress=False)
    assert hub_server.requests == []
    (out / "adapter_model.safetensors.tmp-lora-convert-77").unlink()
    assert push_folder(out, "org/partial", progress=False).commit_oid == hub_server.head("org/partial")

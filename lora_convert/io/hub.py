"""Hugging Face Hub input and output.

* :func:`resolve_checkpoint` turns ``org/name[@revision]`` into a local snapshot folder (through
  ``huggingface_hub``'s cache, so ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and
  ``HF_HUB_OFFLINE`` are honoured), fetching only the files a converter needs.  An existing local
  path always wins.
* :func:`push_folder` uploads a finished output folder as one commit, creating the repo and the
  branch when needed.

Every Hub failure becomes a :class:`~lora_convert.errors.HubError` whose one-line message names
the repo and says what to do.  Tokens are never put in messages or logs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, HubError, LoraConvertError, option
from ..progress import hub_progress
from .files import MAX_INDEX_BYTES, load_json
from .output import TMP_MARK
from .safetensors_format import read_header

__all__ = [
    "DEFAULT_ALLOW_PATTERNS",
    "PushResult",
    "check_complete_output",
    "check_push_access",
    "hub_repo_id",
    "is_repo_id",
    "parse_repo_ref",
    "push_folder",
    "resolve_checkpoint",
]

#: Files fetched from a repo when the caller gives no patterns.  ``*.bin`` weights are added only
#: when the revision has no ``*.safetensors`` file (see :func:`default_allow_patterns`).
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.txt",
    "*.jinja",
    "README.md",
)
_BIN_PATTERNS: tuple[str, ...] = ("*.bin", "*.bin.index.json")


_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID_RE = re.compile(rf"^{_NAME}/{_NAME}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


# --------------------------------------------------------------------------- repo ids


def is_repo_id(s: str) -> bool:
    """True for ``namespace/name`` as the Hub accepts it (ASCII letters, digits, ``.``, ``_``, ``-``).

    A namespace is required: a bare ``name`` is treated as a local path, never as a repo.
    """
    if not isinstance(s, str) or not _REPO_ID_RE.match(s):
        return False
    if "--" in s or ".." in s or s.endswith(".git"):
        return False
    return True


def parse_repo_ref(s: str) -> tuple[str, str | None]:
    """Split ``org/name`` or ``org/name@revision`` into ``(repo_id, revision or None)``.

    The revision may itself contain ``/`` (``org/name@refs/pr/3``).  Raises :class:`HubError` when
    ``s`` is not a valid reference.
    """
    ref = s.strip() if isinstance(s, str) else s
    if not isinstance(ref, str) or not ref:
        raise HubError(f"{s!r} is not a Hub repo id", hint="use namespace/name or namespace/name@revision")
    repo_id, sep, revision = ref.partition("@")
    if not is_repo_id(repo_id):
        raise HubError(
            f"{repo_id!r} is not a valid Hub repo id",
            hint="use namespace/name with letters, digits, '.', '_' or '-' (no '--' or '..')",
        )
    if sep and (not revision or revision.strip() != revision or ".." in revision or revision.startswith("/")):
        raise HubError(f"{s!r} has an invalid revision after '@'", hint="use a branch, tag or commit hash")
    return repo_id, (revision or None)


def hub_repo_id(ref: str | os.PathLike[str] | None) -> str | None:
    """The Hub repo a reference names, for metadata (a model card's ``base_model``), or None.

    ``org/name[@revision]`` that is not an existing local path (the rule :func:`resolve_checkpoint` follows)
    gives ``org/name``; so does a folder inside the Hub cache (``.../models--org--name/snapshots/<commit>``).
    Any other local path gives None: ``fixtures/base`` is a folder on someone's disk, not metadata the Hub can
    link."""
    if ref is None:
        return None
    text = os.fspath(ref)
    if not os.path.exists(Path(text).expanduser()):  # (False for a name too long, rather than raising)
        try:
            return parse_repo_ref(text)[0]
        except HubError:
            return None
    parts = Path(text).expanduser().resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            repo = part.removeprefix("models--").replace("--", "/", 1)
            return repo if is_repo_id(repo) else None
    return None


def _looks_like_repo_ref(s: str) -> bool:
    try:
        parse_repo_ref(s)
    except HubError:
        return False
    return True


# --------------------------------------------------------------------------- error mapping


def _hf():
    """huggingface_hub's exception classes (imported lazily: the Hub is optional at run time)."""
    import huggingface_hub.errors as e

    return e


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod_name in ("httpx2", "httpx"):
        try:
            mod = __import__(mod_name)
            errors.append(mod.TransportError)
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        errors.append(requests.exceptions.ConnectionError)
        errors.append(requests.exceptions.Timeout)
    except ImportError:
        pass
    return tuple(errors)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_reason(exc: BaseException) -> str:
    """A short, single-line reason from the server, if it gave one (never contains the token)."""
    msg = getattr(exc, "server_message", None) or ""
    msg = " ".join(str(msg).split())
    return msg[:200]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _map_error(exc: BaseException, repo_id: str, action: str, revision: str | None = None) -> HubError:
    """Turn whatever huggingface_hub raised into one :class:`HubError` line."""
    e = _hf()
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    if isinstance(exc, ValueError) and not isinstance(exc, (e.HfHubHTTPError, e.HFValidationError)):
        # huggingface_hub's own checks (invalid README metadata, malformed server answers...)
        text = " ".join(str(exc).split())[:300]
        return HubError(f"cannot {action} {where}: {text}", hint="fix the input and retry")
    transport = _transport_errors()
    for err in _chain(exc):
        reason = _server_reason(err)
        suffix = f": {reason}" if reason else ""
        if isinstance(err, e.GatedRepoError):
            return HubError(
                f"cannot {action} {where}: the repo is gated and this account has not been granted access",
                hint="accept the conditions on the repo page, then use a token of that account (HF_TOKEN)",
            )
        if isinstance(err, e.RepositoryNotFoundError):
            return HubError(
                f"cannot {action} {where}: repository not found or not accessible (HTTP {_status(err)})",
                hint="check the repo id; for a private repo set HF_TOKEN or run `hf auth login`",
            )
        if isinstance(err, e.RevisionNotFoundError):
            return HubError(
                f"cannot {action} {where}: revision not found in the repo",
                hint="check the branch, tag or commit after '@'",
            )
        if isinstance(err, e.LocalEntryNotFoundError) and _offline():
            return HubError(
                f"cannot {action} {where}: offline mode is on (HF_HUB_OFFLINE) and the files are not (all) cached",
                hint="unset HF_HUB_OFFLINE or download the repo once while online",
            )
        if isinstance(err, e.LocalEntryNotFoundError):
            if any(isinstance(c, (e.HfHubHTTPError, *transport)) for c in list(_chain(err))[1:]):
                continue  # the underlying HTTP or network error says more
            return HubError(
                f"cannot {action} {where}: the Hub cannot be reached and the files are not (all) in the local cache",
                hint="connect and unset HF_HUB_OFFLINE, or download the repo once while online",
            )
        if isinstance(err, e.OfflineModeIsEnabled):
            return HubError(
                f"cannot {action} {where}: offline mode is on (HF_HUB_OFFLINE) and nothing usable is cached",
                hint="unset HF_HUB_OFFLINE or download the repo once while online",
            )
        if isinstance(err, e.HfHubHTTPError):
            code = _status(err)
            if code == 401:
                return HubError(
                    f"cannot {action} {where}: the Hub rejected the token (HTTP 401){suffix}",
                    hint="set a valid HF_TOKEN or run `hf auth login`",
                )
            if code == 403:
                return HubError(
                    f"cannot {action} {where}: permission denied (HTTP 403){suffix}",
                    hint="use a token with write access to this namespace",
                )
            if code == 404:
                return HubError(
                    f"cannot {action} {where}: not found (HTTP 404){suffix}",
                    hint="check the repo id, the revision and that your token can see the repo",
                )
            if code is not None and code >= 500:
                return HubError(
                    f"cannot {action} {where}: Hub server error (HTTP {code}){suffix}",
                    hint="the Hub may be down; retry later",
                )
            return HubError(
                f"cannot {action} {where}: Hub request failed (HTTP {code}){suffix}",
                hint="check the arguments and retry",
            )
        if isinstance(err, transport):
            return HubError(
                f"cannot {action} {where}: the Hub cannot be reached ({type(err).__name__})",
                hint="check the network, HF_ENDPOINT and proxy settings, or retry later",
            )
        if isinstance(err, e.HFValidationError):
            return HubError(f"cannot {action} {where}: invalid argument ({' '.join(str(err).split())[:200]})")
    text = " ".join(str(exc).split())[:200]
    return HubError(f"cannot {action} {where}: {type(exc).__name__}: {text}", hint="see the error above and retry")


# --------------------------------------------------------------------------- download


def default_allow_patterns(files: list[str] | None) -> list[str]:
    """The download patterns for a revision holding ``files`` (``None``: unknown, assume safetensors)."""
    patterns = list(DEFAULT_ALLOW_PATTERNS)
    if files is not None and not any(f.endswith(".safetensors") for f in files):
        patterns[2:2] = _BIN_PATTERNS
    return patterns


def _offline() -> bool:
    import huggingface_hub.constants as c

    return bool(getattr(c, "HF_HUB_OFFLINE", False))


def _cached_files(repo_id: str, revision: str | None) -> list[str] | None:
    """Files of the cached snapshot of ``repo_id@revision`` (no network); None if nothing is cached."""
    import huggingface_hub.constants as c

    storage = Path(c.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    if _COMMIT_RE.match(rev):
        commit = rev
    else:
        ref = storage / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = storage / "snapshots" / commit
    if not snap.is_dir():
        return None
    return [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()]


def _remote_files(repo_id: str, revision: str | None) -> list[str] | None:
    """Files of ``repo_id@revision`` on the Hub, from the cache when offline or unreachable.

    Raises :class:`HubError` for answers that settle it (missing repo, bad token...) and when the
    Hub cannot be reached and nothing is cached.
    """
    from huggingface_hub import HfApi

    e = _hf()
    if not _offline():
        try:
            info = HfApi().repo_info(repo_id, revision=revision)
            return [s.rfilename for s in (getattr(info, "siblings", None) or [])]
        except e.HfHubHTTPError as err:
            status = _status(err)
            if isinstance(err, (e.RepositoryNotFoundError, e.RevisionNotFoundError)) or (status or 0) < 500:
                raise _map_error(err, repo_id, "download", revision) from err
            cause: BaseException = err  # Hub down: try the cache like huggingface_hub does
        except (*_transport_errors(), e.OfflineModeIsEnabled) as err:
            cause = err
    else:
        cause = e.OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
    cached = _cached_files(repo_id, revision)
    if cached is None:
        raise _map_error(cause, repo_id, "download", revision) from cause
    return cached


def resolve_checkpoint(ref: str | os.PathLike[str], *, allow_patterns: list[str] | None = None) -> Path:
    """A local folder or file for ``ref``: an existing local path, else a Hub snapshot.

    ``ref`` is a path, or ``org/name`` / ``org/name@revision``.  An existing path always wins over a
    repo id of the same spelling.  Repos are fetched with ``huggingface_hub.snapshot_download``
    (cache, ``HF_HOME``, ``HF_HUB_OFFLINE`` honoured), limited to ``allow_patterns`` or by default
    to weights, configs, tokenizer files and the model card (``*.bin`` only when the revision has no
    ``*.safetensors``).

    Raises :class:`CheckpointError` for a path that does not exist and is no repo id, and
    :class:`HubError` for any Hub failure.
    """
    text = os.fspath(ref)
    local = Path(text).expanduser()
    if os.path.exists(local):  # (False for a name too long or holding a NUL, rather than raising)
        return local
    if not _looks_like_repo_ref(text):
        raise CheckpointError(
            "path does not exist",
            path=text,
            hint="give an existing file or folder, or a Hub repo as namespace/name[@revision]",
        )
    repo_id, revision = parse_repo_ref(text)

    from huggingface_hub import snapshot_download

    patterns = (
        list(allow_patterns) if allow_patterns is not None else default_allow_patterns(_remote_files(repo_id, revision))
    )
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except HubError:
        raise
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one HubError line
        raise _map_error(err, repo_id, "download", revision) from err
    return Path(folder)


# --------------------------------------------------------------------------- upload


@dataclass
class PushResult:
    """What :func:`push_folder` committed."""

    repo_id: str
    revision: str  # the branch (or refs/pr/N) the commit landed on
    commit_url: str
    commit_oid: str
    files: list[str] = field(default_factory=list)  # paths (relative, posix) of the files pushed
    pr_url: str | None = None


def _is_safetensors_sound(path: Path) -> str | None:
    """A problem with a safetensors file's framing, or None (cheap: reads only the header)."""
    try:
        read_header(path)
    except CheckpointError as exc:
        return exc.message + (f" ({exc.hint})" if exc.hint else "")
    return None


def check_complete_output(folder: str | os.PathLike[str]) -> list[str]:
    """Problems that make ``folder`` not a complete conversion output (empty list: fine to push).

    Looks for a leftover temporary name (``*.tmp-lora-convert*``), index files naming missing
    shards, truncated safetensors files, an ``adapter_config.json`` without adapter weights, and a
    folder with no weights at all.
    """
    root = Path(folder)
    if not root.is_dir():
        return [f"{root} is not a folder"]
    problems: list[str] = []
    files: list[str] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if ".git" in p.relative_to(root).parts:
            continue
        if TMP_MARK in p.name:
            problems.append(f"leftover temporary {'folder' if p.is_dir() else 'file'} {rel} (interrupted write?)")
            continue
        if any(TMP_MARK in part for part in p.relative_to(root).parts[:-1]):
            continue
        if p.is_file():
            files.append(rel)

    for rel in files:
        if rel.endswith(".index.json"):
            try:
                weight_map = load_json(root / rel, what="an index", max_bytes=MAX_INDEX_BYTES)["weight_map"]
                shards = set(weight_map.values())
            except (LoraConvertError, KeyError, TypeError, AttributeError):
                problems.append(f"{rel} is not a valid index (no weight_map)")
                continue
            parent = Path(rel).parent
            for shard in sorted(shards):
                if not isinstance(shard, str) or not (root / parent / shard).is_file():
                    problems.append(f"{rel} names missing shard {shard}")
        elif rel.endswith(".safetensors"):
            issue = _is_safetensors_sound(root / rel)
            if issue:
                problems.append(f"{rel}: {issue}")

    weights = [f for f in files if f.endswith(_WEIGHT_SUFFIXES)]
    names = {Path(f).name for f in files}
    adapter_weights = [f for f in weights if Path(f).name.startswith("adapter_model.") or f == "adapters.safetensors"]
    if "adapter_config.json" in names and not adapter_weights:  # adapters.safetensors: an mlx-lm adapter
        problems.append("adapter_config.json without adapter_model.safetensors / adapter_model.bin")
    if not weights:
        problems.append("no weight files (*.safetensors, *.bin) and no adapter files")
    return problems


def _pushed_files(src: Path) -> list[str]:
    """The paths ``upload_folder`` sends: everything but ``.git`` and ``.cache/huggingface`` folders."""
    out = []
    for p in src.rglob("*"):
        parts = p.relative_to(src).parts
        if not p.is_file() or ".git" in parts:
            continue
        if any(parts[i : i + 2] == (".cache", "huggingface") for i in range(len(parts) - 1)):
            continue
        out.append("/".join(parts))
    return sorted(out)


def _check_push(src: Path, repo_id: str, *, revision: str | None, create_pr: bool, force: bool) -> None:
    """Everything about a push that can be refused before talking to the Hub."""
    if not src.is_dir():
        raise CheckpointError("folder to push does not exist or is not a folder", path=src)
    if not is_repo_id(repo_id):
        raise HubError(
            f"cannot push to {repo_id!r}: not a valid Hub repo id",
            hint="use namespace/name with letters, digits, '.', '_' or '-'",
        )
    if create_pr and revision not in (None, "main"):
        raise HubError(
            f"cannot push to '{repo_id}': create_pr opens a pull request against main",
            hint="drop the revision, or push to the branch without create_pr",
        )
    if revision is not None and (not revision.strip() or _COMMIT_RE.match(revision)):
        raise HubError(
            f"cannot push to '{repo_id}' at {revision!r}: a commit must go to a branch", hint="name a branch"
        )
    if not force:
        problems = check_complete_output(src)
        if problems:
            raise HubError(
                f"refusing to push {src} to '{repo_id}': "
                + "; ".join(problems[:5])
                + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""),
                hint=f"finish or redo the conversion, or pass {option('force')}",
            )


def push_token(repo_id: str, token: str | None = None) -> str:
    """The token a push to ``repo_id`` will use, or a HubError saying how to provide one."""
    from huggingface_hub.utils import get_token

    if _offline():
        raise HubError(f"cannot push to '{repo_id}': offline mode is on (HF_HUB_OFFLINE)", hint="unset HF_HUB_OFFLINE")
    tok = token or get_token()
    if not tok:
        raise HubError(
            f"cannot push to '{repo_id}': no Hub token found",
            hint=f"set HF_TOKEN, run `hf auth login`, or pass {option('token', 'TOKEN')}",
        )
    return tok


def check_push_access(repo_id: str, token: str | None = None) -> str:
    """Before any work: the token a push to ``repo_id`` will use, checked with the Hub — it is valid and may
    write that repo (or create it in that namespace).  Returns the token; raises :class:`HubError` saying
    what to fix.  A conversion with a push calls it first, so a missing or read-only token costs nothing."""
    if not is_repo_id(repo_id):
        raise HubError(
            f"cannot push to {repo_id!r}: not a valid Hub repo id",
            hint="use namespace/name with letters, digits, '.', '_' or '-'",
        )
    tok = push_token(repo_id, token)
    from huggingface_hub import HfApi

    e, api = _hf(), HfApi(token=tok)
    try:
        who = api.whoami()
        api.auth_check(repo_id, write=True)
        return tok
    except e.RepositoryNotFoundError:
        pass  # not there yet (or not visible): the push creates it, if the namespace is the token's
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one HubError line
        raise _map_error(err, repo_id, "push to") from err
    namespace = repo_id.split("/", 1)[0]
    mine = [who.get("name")] + [o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict)]
    if namespace not in mine:
        raise HubError(
            f"cannot push to '{repo_id}': the token's account ({who.get('name')}) cannot create a repo under "
            f"'{namespace}' (its namespaces: {', '.join(str(n) for n in mine if n)})",
            hint="push under one of those namespaces, or use a token of an account that belongs to it",
        )
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(f"cannot push to '{repo_id}': the token is read-only", hint="use a token with write access")
    return tok


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    progress: bool = True,
    force: bool = False,
) -> PushResult:
    """Upload ``folder`` to the model repo ``repo_id`` as one commit.

    Creates the repo (``private`` only applies to a new repo) and, when ``revision`` names a branch
    other than ``main`` that does not exist yet, the branch (from ``main``).  ``create_pr`` opens a
    pull request against ``main`` instead of committing to a branch.  Unless ``force``, refuses a
    folder for which :func:`check_complete_output` reports problems.

    Any failure raises :class:`HubError`; a result is returned only once the Hub confirmed the commit.
    """
    src = Path(folder)
    _check_push(src, repo_id, revision=revision, create_pr=create_pr, force=force)
    from huggingface_hub import HfApi

    api = HfApi(token=push_token(repo_id, token))
    branch = revision or "main"
    files = _pushed_files(src)
    step = "create"
    try:
        with hub_progress(progress):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if not create_pr and branch != "main" and not branch.startswith("refs/pr/"):
                step = "create branch"
                api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
            step = "push to"
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=src,
                commit_message=message or "Upload converted checkpoint with lora-convert",
                revision=None if create_pr else branch,
                create_pr=create_pr,
                repo_type="model",
            )
    except HubError:
        raise
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one HubError line
        raise _map_error(err, repo_id, step, None if create_pr else branch) from err

    oid = getattr(info, "oid", None)
    url = getattr(info, "commit_url", None)
    if not oid or not url:
        raise HubError(f"push to '{repo_id}' got no commit back from the Hub", hint="check the repo page and retry")
    landed = getattr(info, "pr_revision", None) or branch
    return PushResult(
        repo_id=repo_id,
        revision=landed,
        commit_url=str(url),
        commit_oid=str(oid),
        files=files,
        pr_url=getattr(info, "pr_url", None),
    )

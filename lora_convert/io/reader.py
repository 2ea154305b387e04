"""Lazy checkpoints: list every tensor from headers, read one tensor (or a block of rows) at a time.

A checkpoint is a folder (or one file) of :mod:`~lora_convert.io.sources`, one per shard; this module
finds the files (Hugging Face layouts, sharded indexes, named-adapter subfolders) and turns row and
element ranges into byte ranges.  Torch is imported only when tensor data is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsafeInputError, option
from .files import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, file_problem, load_json
from .safetensors_format import MAX_TENSORS, TensorInfo, add_metadata, decode_scalar
from .sources import SafetensorsSource, TensorSource, open_source

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MLX_ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx-lm's; its checkpoints are {iteration:07d}_adapters.safetensors
DIFFUSERS_STEM = "diffusion_pytorch_model"  # a diffusers model's weights (a UNet, a transformer)
MODEL_INDEXES = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    f"{DIFFUSERS_STEM}.safetensors.index.json",
    f"{DIFFUSERS_STEM}.bin.index.json",
)
MODEL_SINGLES = ("model.safetensors", "pytorch_model.bin", f"{DIFFUSERS_STEM}.safetensors", f"{DIFFUSERS_STEM}.bin")


@dataclass
class Checkpoint:
    """A checkpoint on disk.  Holds headers and open sources, never tensor data."""

    root: Path  # the folder (or the file's folder)
    files: list[Path]
    layout: str  # "safetensors", "sharded-safetensors", "bin", "sharded-bin"
    kind: str  # "adapter" (adapter_model.*) or "model"
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # config.json as stored (inputs.open_local type-checks its keys)
    adapter_config_path: Path | None = None
    adapter_name: str | None = None  # from a named-adapter subfolder
    sources: list[TensorSource] = field(default_factory=list, repr=False)
    config_path: Path | None = None  # where config came from
    single_file: bool = False  # opened from one weights file (its folder is where config files were looked for)

    # -- listing ---------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def stem(self) -> str:
        """The weights' file stem, which a model written from this one keeps (diffusers loads only its own)."""
        return DIFFUSERS_STEM if self.files and self.files[0].name.startswith(DIFFUSERS_STEM) else "model"

    def read_scalar(self, name: str) -> float:
        """A one-element tensor's value (kohya's ``.alpha``) without torch, for the header-only commands."""
        info = self.info(name)
        if info.numel != 1:
            raise CheckpointError(f"expected one value, found shape {list(info.shape)}", path=info.file, tensor=name)
        if not isinstance(info.source, SafetensorsSource):
            return float(self.read(name).reshape(-1)[0])
        try:
            with open(info.file, "rb") as fh:
                fh.seek(info.offset)
                data = fh.read(info.nbytes)
        except OSError as exc:
            raise CheckpointError(f"cannot read: {exc.strerror}", path=info.file, tensor=name) from None
        if len(data) != info.nbytes:
            raise CheckpointError("file ended while reading this tensor", path=info.file, tensor=name)
        try:
            return decode_scalar(data, info.dtype_name)
        except CheckpointError as exc:  # named here, where the file and tensor are known
            raise CheckpointError(exc.message, path=info.file, tensor=name) from None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtypes(self) -> dict[str, int]:
        """Bytes per dtype name."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype_name] = out.get(t.dtype_name, 0) + t.nbytes
        return out

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError("no such tensor", path=self.root, tensor=name) from None

    # -- reading -----------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, in its stored dtype, owned by the caller."""
        info = self.info(name)
        return info.source.read_into(info, 0, info.nbytes, None).view(info.dtype).reshape(info.shape)

    def rows_of(self, name: str) -> StoredRows:
        """Tensor ``name`` as rows to read, for code that must not know checkpoints (``difference.Rows``)."""
        return StoredRows(self, name)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along dim 0) — a contiguous byte range of its data.

        With ``out`` (a contiguous tensor of the stored dtype and at least that many elements) the
        bytes land there and a view of it is returned: the streaming routes reuse a few buffers
        instead of faulting in fresh pages for every block."""
        info = self.info(name)
        if not info.shape:
            return self.read(name)
        offset, nbytes = self.span(name, start, stop)
        rows = max(0, min(stop, info.shape[0]) - start)
        data = info.source.read_into(info, offset, nbytes, _byte_view(out, info, nbytes, f"rows {start}:{stop}"))
        return data.view(info.dtype).reshape((rows, *info.shape[1:]))

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor (1-D): a contiguous byte range whatever the
        shape, so a copy can move a tensor whose single rows are huge (fused MoE experts) in
        bounded pieces."""
        info = self.info(name)
        offset, nbytes = self.span(name, start, stop, flat=True)
        buf = _byte_view(out, info, nbytes, f"elements {start}:{stop}")
        return info.source.read_into(info, offset, nbytes, buf).view(info.dtype)

    def read_block(self, name: str, start: int, stop: int, slot: torch.Tensor, *, flat: bool = False) -> torch.Tensor:
        """:meth:`read_rows` (or, with ``flat``, :meth:`read_flat`) into ``slot`` (uint8, contiguous, at least the
        block's bytes; every byte of it scratch): where the file allows, one direct read lands the block
        somewhere inside ``slot`` with no copy (``slot`` needs :data:`~lora_convert.io.direct.ALIGN` bytes of
        room on each side for that), and the block returned is a view of it.  The pipeline's reader reads so."""
        info = self.info(name)
        offset, nbytes = self.span(name, start, stop, flat=flat)
        if info.shape and isinstance(info.source, SafetensorsSource):
            got = info.source.read_spare(info, offset, nbytes, slot)
            if got is not None and got.storage_offset() % info.itemsize == 0:
                data = got.view(info.dtype)
                if flat:
                    return data
                rows = max(0, min(stop, info.shape[0]) - start)
                return data.reshape((rows, *info.shape[1:]))
        out = slot[:nbytes].view(info.dtype)
        return (self.read_flat if flat else self.read_rows)(name, start, stop, out=out)

    def span(self, name: str, start: int, stop: int, *, flat: bool = False) -> tuple[int, int]:
        """(offset within the tensor's data, byte count) of rows ``start:stop`` — or, with ``flat``, of
        elements of the flattened tensor — clamped to the tensor's end.  The one place that turns a
        block into bytes: reads, prefetches and the pipeline's read-ahead window all go through it."""
        info = self.info(name)
        if flat:
            unit, count = info.itemsize, info.nbytes // info.itemsize
        else:
            count = info.shape[0] if info.shape else 1
            unit = info.nbytes // count if count else 0
        start = min(start, count)
        return start * unit, (max(start, min(stop, count)) - start) * unit

    def prefetch(self, name: str, start: int, stop: int, *, flat: bool = False) -> None:
        """Ask for rows ``start:stop`` to be read ahead (see :meth:`TensorSource.prefetch`)."""
        info = self.tensors.get(name)
        if info is not None and info.shape:
            info.source.prefetch(info, *self.span(name, start, stop, flat=flat))

    def close(self) -> None:
        for src in self.sources:
            src.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _byte_view(out: torch.Tensor | None, info: TensorInfo, nbytes: int, what: str) -> torch.Tensor | None:
    """The first ``nbytes`` of the caller's buffer as uint8, after checking it can hold them."""
    if out is None:
        return None
    import torch

    if out.dtype != info.dtype or not out.is_contiguous() or out.numel() * out.element_size() < nbytes:
        raise ValueError(f"{info.name}: buffer of {out.dtype} x {out.numel()} cannot hold {what}")
    return out.reshape(-1).view(torch.uint8)[:nbytes]


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object kept as its (key, value) pairs, so that repeated keys stay visible."""


def _load_json(path: Path, *, keep_pairs: bool = False) -> Any:
    index = path.name.endswith(".index.json")
    return load_json(
        path,
        what="an index" if index else "a config file",
        max_bytes=MAX_INDEX_BYTES if index else MAX_CONFIG_BYTES,
        object_pairs_hook=_Pairs if keep_pairs else None,
    )


def _safe_member(root: Path, rel: Any, index: Path) -> Path:
    """A shard named in an index must be a plain file inside the checkpoint folder."""
    # Checked on the spelling, not on the resolved path: a Hub cache snapshot is a folder of
    # symlinks into ../../blobs, which is fine; an index that *names* a path outside is not.
    if not isinstance(rel, str) or not rel:
        raise UnsafeInputError(f"shard path {rel!r} is not a file name", path=index)
    if (
        rel.startswith(("/", "\\"))
        or ".." in rel.replace("\\", "/").split("/")
        or ":" in rel
        or "\0" in rel
        or Path(rel).is_absolute()
    ):
        raise UnsafeInputError(
            f"shard path {rel!r} escapes the checkpoint folder",
            path=index,
            hint="an index may only name files inside its own folder",
        )
    return root / rel


def _add_file(
    tensors: dict[str, TensorInfo], sources: list[TensorSource], path: Path, only: set[str] | None = None
) -> dict[str, str]:
    src = open_source(path, max_tensors=MAX_TENSORS - len(tensors))  # a bound for all shards together
    sources.append(src)
    for name, info in src.infos().items():
        if only is not None and name not in only:
            continue
        if name in tensors:
            raise CheckpointError(
                f"tensor appears in two shards ({tensors[name].file.name} and {path.name})", path=path, tensor=name
            )
        tensors[name] = info
    return src.metadata


def _is_adapter_dir(p: Path) -> bool:
    return p.is_dir() and (p / "adapter_config.json").is_file() and any((p / f).is_file() for f in ADAPTER_WEIGHTS)


def named_adapters(root: Path) -> list[str]:
    """Names of the adapters PEFT saved in subfolders of ``root`` (every adapter but ``default``), as
    ``--adapter`` accepts them."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _is_adapter_dir(p))


def _pick_adapter_dir(root: Path, adapter_name: str | None) -> tuple[Path, str | None]:
    """An adapter folder may hold named adapters in subfolders (PEFT's save of non-default names).  A
    subfolder with a config but no weights is a named adapter's config beside an unmerged checkpoint."""
    if adapter_name and _is_adapter_dir(root / adapter_name):
        return root / adapter_name, adapter_name
    if any((root / f).is_file() for f in ADAPTER_WEIGHTS):
        return root, None
    subs = named_adapters(root)
    if len(subs) == 1:
        return root / subs[0], subs[0]
    if len(subs) > 1:
        raise CheckpointError(
            f"holds several named adapters: {', '.join(subs)}",
            path=root,
            hint=f"choose one with {option('adapter', 'NAME')}",
        )
    return root, None


def open_checkpoint(path: str | Path, *, adapter_name: str | None = None) -> Checkpoint:
    """Open a folder in Hugging Face layout, or a single weights file, from headers only."""
    path = Path(path)
    if not os.path.exists(path):  # (False for a name too long or holding a NUL, rather than raising)
        raise CheckpointError("no such file or folder", path=path)
    tensors: dict[str, TensorInfo] = {}
    sources: list[TensorSource] = []
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointError("not a .safetensors or .bin file", path=path)
        metadata: dict[str, str] = add_metadata({}, _add_file(tensors, sources, path), path)
        root = path.parent
        kind = (
            "adapter" if path.name.startswith("adapter_model") or path.name.endswith(MLX_ADAPTER_WEIGHTS) else "model"
        )
        layout = "bin" if path.suffix != ".safetensors" else "safetensors"
        cfg_path = root / "adapter_config.json"
        ck = Checkpoint(
            root,
            [path],
            layout,
            kind,
            tensors,
            metadata,
            None,
            cfg_path if kind == "adapter" and cfg_path.is_file() else None,
            sources=sources,
            single_file=True,
        )
        _attach_config(ck, root)
        return ck
    root, picked = _pick_adapter_dir(path, adapter_name)
    files: list[Path] = []
    metadata = {}
    kind = "model"
    layout = ""
    if (root / "adapter_model.safetensors").is_file():
        files, kind, layout = [root / "adapter_model.safetensors"], "adapter", "safetensors"
    elif (root / "adapter_model.bin").is_file():
        files, kind, layout = [root / "adapter_model.bin"], "adapter", "bin"
    elif (root / MLX_ADAPTER_WEIGHTS).is_file():  # not the trainer's checkpoints beside it
        files, kind, layout = [root / MLX_ADAPTER_WEIGHTS], "adapter", "safetensors"
    else:
        for index_name in MODEL_INDEXES:
            index = root / index_name
            if index.is_file():
                files = _files_from_index(root, index, tensors, sources)
                layout = "sharded-" + ("bin" if ".bin." in index_name else "safetensors")
                break
        else:
            for single in MODEL_SINGLES:
                if (root / single).is_file():
                    files, layout = [root / single], single.rsplit(".", 1)[1]
                    break
            else:
                files = _loose_files(root)
                layout = "safetensors" if len(files) == 1 else "sharded-safetensors"
    if not tensors:
        for f in files:
            add_metadata(metadata, _add_file(tensors, sources, f), f)
    adapter_config = root / "adapter_config.json"
    ck = Checkpoint(
        root,
        files,
        layout,
        kind,
        tensors,
        metadata,
        None,
        adapter_config if adapter_config.is_file() else None,
        picked,
        sources=sources,
    )
    _attach_config(ck, path if picked else root)
    return ck


def _loose_files(root: Path) -> list[Path]:
    """A folder's safetensors files when none has a known name (a kohya LoRA, hand-made shards)."""
    loose = sorted(root.glob("*.safetensors"))
    if not loose and (root / "model_index.json").is_file():
        raise CheckpointError(
            "a diffusers pipeline folder: its models are in subfolders",
            path=root,
            hint="give the component's folder, e.g. unet/ or text_encoder/",
        )
    if not loose:
        raise CheckpointError(
            "no weights found (expected model.safetensors, an index, pytorch_model.bin or adapter_model.safetensors)",
            path=root,
        )
    return loose


def _files_from_index(
    root: Path, index: Path, tensors: dict[str, TensorInfo], sources: list[TensorSource]
) -> list[Path]:
    data = _load_json(index, keep_pairs=True)
    top = dict(data) if isinstance(data, _Pairs) else None
    pairs = top.get("weight_map") if top is not None else None
    if not isinstance(pairs, _Pairs) or not pairs:
        raise CheckpointError("index has no weight_map", path=index)
    wm: dict[str, Any] = {}
    for name, rel in pairs:
        if name in wm and wm[name] != rel:
            raise CheckpointError(
                f"index places this tensor in two shards ({wm[name]} and {rel})",
                path=index,
                tensor=name,
                hint="the index is corrupted; re-download it",
            )
        wm[name] = rel
    by_file: dict[str, set[str]] = {}
    for name, rel in wm.items():
        _safe_member(root, rel, index)
        by_file.setdefault(rel, set()).add(name)
    files = []
    for rel, names in by_file.items():
        f = _safe_member(root, rel, index)
        problem = file_problem(f)
        if problem:
            raise CheckpointError(
                f"index names shard {rel!r}, which {problem}", path=index, hint="download every shard the index lists"
            )
        files.append(f)
        _add_file(tensors, sources, f, only=names)
        missing = names - {n for n, t in tensors.items() if t.file == f}
        if missing:
            first = sorted(missing)[0]
            raise CheckpointError(
                f"index places this tensor in {rel}, which does not hold it", path=index, tensor=first
            )
    return files


def _attach_config(ck: Checkpoint, folder: Path) -> None:
    """config.json, parsed and bounded (io/files.py) but not interpreted: what its keys mean, and so what
    types they must have, is the model facts' business (``arch.check_model_config``, via inputs.open_local)."""
    for candidate in (ck.root / "config.json", folder / "config.json"):
        if candidate.is_file():
            data = _load_json(candidate)
            ck.config = data if isinstance(data, dict) else None
            ck.config_path = candidate
            return


@dataclass(frozen=True)
class StoredRows:
    """One tensor of a checkpoint read by rows (a 0-d tensor is one row): the shape of ``difference.Rows``."""

    ck: Checkpoint
    name: str

    @property
    def path(self) -> str:
        return str(self.ck.root)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ck.info(self.name).shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.ck.read_rows(self.name, start, stop) if self.shape else self.ck.read(self.name)

"""kohya-ss / sd-scripts LoRA files — what most image-model trainers, ComfyUI and A1111 use.

One safetensors file; per adapted module ``<prefix>_<path>.lora_down.weight`` (A), ``.lora_up.weight``
(B) and a 0-d ``.alpha``, where ``<prefix>`` names the pipeline component (``lora_unet``, ``lora_te``,
``lora_te1``/``lora_te2`` for SDXL's two text encoders: :data:`diffusion_names.KOHYA_PREFIXES`) and ``<path>`` is
the module's path with every ``.`` written ``_``.

* Scaling: ``alpha / rank``; a missing ``.alpha`` (old files) or 0 means alpha = rank, scale 1
  (sd-scripts' ``LoRAModule`` and ``create_network_from_weights``).
* Kinds: Linear (down (r, in), up (out, r)) and convolutions (down (r, in, k, k), up (out, r, 1, 1)).
* Names: each path is read back as ``<component>.<dotted path>`` with the module names diffusers and CLIP
  use (:data:`diffusion_names.KOHYA_COMPOUNDS`); the inventory is ``spelled``, so against a base the base's own
  tensor names settle every reading, and a reading the names alone cannot settle is marked ``unsure``.
* LyCORIS's LoHa, LoKr, full-diff, Diag-OFT and BOFT modules (same names, other tensors) are read beside LoRA pairs by
  :mod:`.lycoris`, one algorithm per module, told by its tensors.
* Refused with the reason: the LyCORIS variants not read (Tucker LoCon ``lora_mid``, ``dora_scale``
  weight decomposition, BOFT, IA3, GLoRA, norms) and bundled textual-inversion embeddings.
"""

from __future__ import annotations

import math
import re

from .. import diffusion_names
from ..config import FP32_MAX, AdapterConfig
from ..errors import AdapterError, LoraConvertError, UnsupportedError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from . import lycoris
from .peft import conv_factors

_PREFIX = "|".join(sorted(diffusion_names.KOHYA_PREFIXES, key=len, reverse=True))
_ROLES = "|".join(["lora_down\\.weight", "lora_up\\.weight", "alpha", *lycoris.ROLES])
KEY = re.compile(rf"^(?P<prefix>{_PREFIX})_(?P<name>.+?)\.(?P<role>{_ROLES})$")
_COMPOUNDS = diffusion_names.KOHYA_COMPOUNDS | diffusion_names.KOHYA_SGM_COMPOUNDS
_SPAN = max(c.count("_") + 1 for c in _COMPOUNDS)  # the most '_'-separated tokens one known name spans
_ANY_PREFIX = re.compile(rf"^(?:{_PREFIX})_")
MAX_NAME_CHARS = 1024  # real kohya module names are under 150 characters
_LYCORIS = {  # the LyCORIS variants not read (LoHa, LoKr, full diffs, Diag-OFT, BOFT are: dialects/lycoris.py)
    "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
    "dora_scale": "LyCORIS weight_decompose (DoRA, dora_scale)",
    "oft_": "OFT/BOFT (other than LyCORIS's oft_blocks)",
    "ia3": "IA3",
    "w_norm": "LyCORIS norm layers (w_norm)",
    "b_norm": "LyCORIS norm layers (b_norm)",
    "a1": "GLoRA",
    "lokr_t1": "LoKr with lokr_t1 (no LyCORIS version builds one)",
}


class KohyaDialect:
    """Keys that start with a kohya component prefix (``lora_unet_``, ``lora_te_``, ...)."""

    name = "kohya"

    def claims(self, ck: Checkpoint) -> bool:
        return ck.adapter_config_path is None and any(_ANY_PREFIX.match(k) for k in ck.tensors)

    def read(self, ck: Checkpoint) -> Inventory:
        inv = Inventory(form="adapter", dialect=self.name, spelled=True)
        modules: dict[str, LoraModule] = {}
        alphas: dict[str, float] = {}
        kohya_names: dict[str, str] = {}
        for (prefix, name), roles in sorted(_group_keys(ck).items()):
            if len(name) > MAX_NAME_CHARS:
                key = next(iter(roles.values()))
                raise AdapterError(
                    f"a module name of {len(name)} characters (at most {MAX_NAME_CHARS}; real ones are under 150)",
                    path=ck.info(key).file,
                    tensor=key,
                    hint="this file is corrupted or not a kohya LoRA",
                )
            reading, sure = read_kohya_name(name)
            module = f"{diffusion_names.KOHYA_PREFIXES[prefix]}.{reading}"
            if module in modules:
                raise AdapterError(
                    f"{prefix}_{name} and {kohya_names[module]} are the same module ({module})",
                    path=ck.root,
                    tensor=roles.get("lora_down.weight"),
                )
            kohya_names[module] = f"{prefix}_{name}"
            algo = lycoris.algorithm(ck, roles)
            if algo == "lora":
                modules[module], alphas[module] = _module(ck, module, roles)
            else:
                read_alpha = lycoris.constraint if algo == "diag-oft" else _alpha  # (B)OFT: alpha is a bound
                alpha = read_alpha(ck, roles["alpha"]) if "alpha" in roles else None
                modules[module], alphas[module] = lycoris.read_module(ck, module, roles, algo, alpha)
            if not sure:
                inv.unsure.add(module)
        if not modules:
            raise AdapterError("holds no kohya LoRA modules", path=ck.root)
        inv.lora[DEFAULT_ADAPTER] = modules
        ranks = {m: lm.rank for m, lm in modules.items()}
        inv.configs[DEFAULT_ADAPTER] = AdapterConfig.for_modules(ranks, alphas, source=str(ck.root))
        missing = [m for m in modules if f"{kohya_names[m]}.alpha" not in ck.tensors and modules[m].tuner != "full"]
        if missing:
            inv.warnings[DEFAULT_ADAPTER] = [
                f"{len(missing)} module(s) without .alpha (e.g. {kohya_names[missing[0]]}): alpha = rank, "
                "scale 1, as sd-scripts loads them"
            ]
        return inv


def _group_keys(ck: Checkpoint) -> dict[tuple[str, str], dict[str, str]]:
    """(prefix, name) -> {role: key}, after refusing keys that are not LoRA pairs."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in ck.tensors:
        m = KEY.match(key)
        if m is None:
            raise _refusal(ck, key)
        groups.setdefault((m["prefix"], m["name"]), {})[m["role"]] = key
    return groups


def _refusal(ck: Checkpoint, key: str) -> LoraConvertError:
    """Why ``key`` is not a kohya LoRA key: a LyCORIS variant, bundled embeddings, or unknown."""
    suffix = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else key.rsplit(".", 1)[-1]
    for mark, what in _LYCORIS.items():
        if suffix.startswith(mark):
            return UnsupportedError(
                f"{what} is a LyCORIS variant lora-convert does not read",
                path=ck.root,
                tensor=key,
                hint="LoRA pairs, LoHa, LoKr, full diffs, Diag-OFT and BOFT are read",
            )
    if key.startswith("bundle_emb"):
        return UnsupportedError(
            "bundled textual-inversion embeddings are not LoRA", path=ck.root, tensor=key, hint="save them apart"
        )
    return AdapterError(
        "not a kohya LoRA or LyCORIS key (lora_down.weight, lora_up.weight, alpha; hada_*, lokr_*, diff)",
        path=ck.root,
        tensor=key,
    )


def _module(ck: Checkpoint, module: str, roles: dict[str, str]) -> tuple[LoraModule, float]:
    """One module from its keys, after checking the factors fit; and its alpha."""
    down, up = roles.get("lora_down.weight"), roles.get("lora_up.weight")
    if down is None or up is None:
        have = next(iter(roles.values()))
        raise AdapterError(f"{'lora_down' if down is None else 'lora_up'} is missing", path=ck.root, tensor=have)
    d, u = ck.info(down).shape, ck.info(up).shape
    conv = conv_factors(d, u)
    if not conv and (len(d) != 2 or len(u) != 2):
        raise AdapterError(
            f"lora_down {list(d)} and lora_up {list(u)} are neither Linear nor conv factors", path=ck.root, tensor=down
        )
    if d[0] != u[1] or d[0] == 0:
        raise AdapterError(
            f"rank mismatch: lora_down has {d[0]} rows, lora_up {u[1]} columns", path=ck.root, tensor=down
        )
    rank = d[0]
    alpha = float(rank)
    if "alpha" in roles:
        alpha = _alpha(ck, roles["alpha"]) or float(rank)  # sd-scripts: alpha 0 means alpha = rank
    kind = "conv" if conv else "linear"
    lm = LoraModule(module, DEFAULT_ADAPTER, kind, down, up, rank, math.prod(d[1:]), u[0], scaling=alpha / rank)
    return lm, alpha


ALPHA_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
MAX_ALPHA = 1e6  # real alphas are at most a few thousand (the rank, or a multiple of it)


def _alpha(ck: Checkpoint, key: str) -> float:
    """A module's ``.alpha``: one floating-point value, finite, 0 <= alpha <= :data:`MAX_ALPHA`; anything
    else (a bool, an integer, NaN, 3e38) is refused by name rather than scaling the LoRA by it."""
    info = ck.info(key)
    if info.dtype_name not in ALPHA_DTYPES:
        raise AdapterError(
            f"alpha stored as {info.dtype_name}: a kohya alpha is one floating-point number",
            path=info.file,
            tensor=key,
        )
    if info.dtype_name.startswith("F8"):  # no struct format: read through torch
        if info.numel != 1:
            raise AdapterError(f"alpha has shape {list(info.shape)}, not one value", path=info.file, tensor=key)
        alpha = float(ck.read(key).reshape(-1)[0].float())
    else:
        alpha = ck.read_scalar(key)
    if not math.isfinite(alpha) or abs(alpha) > FP32_MAX:  # (an F64 scalar: the merge computes in fp32)
        raise AdapterError("alpha is not a finite number that float32 can hold", path=info.file, tensor=key)
    if alpha < 0 or alpha > MAX_ALPHA:
        raise AdapterError(
            f"alpha {alpha:g} is {'negative' if alpha < 0 else f'beyond any real one (at most {MAX_ALPHA:g})'}",
            path=info.file,
            tensor=key,
            hint="a kohya alpha is between 0 (meaning: the rank) and a few thousand",
        )
    return alpha


def read_kohya_name(name: str) -> tuple[str, bool]:
    """A kohya module name read back as a dotted path (``down_blocks_0_attentions_0_proj_in`` ->
    ``down_blocks.0.attentions.0.proj_in``), and whether that is the only reading in which every
    component is a known module name or a number.  Otherwise the reading joins the longest known names
    and leaves the rest one component per ``_``: the base's names must settle it.

    A component spans at most :data:`_SPAN` tokens (the longest known compound), so both passes try that
    many spans per token: time O(length × longest compound), not cubic in the number of ``_``."""
    tokens = name.split("_")
    n = len(tokens)
    ways = [0] * n + [1]  # ways[i]: readings of tokens[i:] made only of known names (capped at 2)
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, min(n, i + _SPAN) + 1):
            if _known(tokens[i:j]):
                ways[i] = min(2, ways[i] + ways[j])
    parts, i = [], 0
    while i < n:
        j = next((j for j in range(min(n, i + _SPAN), i + 1, -1) if "_".join(tokens[i:j]) in _COMPOUNDS), i + 1)
        parts.append("_".join(tokens[i:j]))
        i = j
    return ".".join(parts), ways[0] == 1 and all(_known([p]) or p in diffusion_names.KOHYA_COMPOUNDS for p in parts)


def _known(tokens: list[str]) -> bool:
    if len(tokens) == 1:
        return tokens[0].isdigit() or tokens[0] in diffusion_names.KOHYA_PLAIN_NAMES
    return "_".join(tokens) in diffusion_names.KOHYA_COMPOUNDS

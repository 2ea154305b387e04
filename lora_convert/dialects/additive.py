"""PEFT's newer additive tuners whose ΔW is neither low-rank nor a LyCORIS product: SHiRA (``peft_type: SHIRA``)
and FourierFT (``FOURIERFT``).  Each module is a :class:`LoraModule` with ``tuner`` set and its tensors by
PEFT's parameter name in ``factors``; the merge builds its ΔW (``routes/additive_terms.py``, math in
``additive_math.py``), split and attach move those tensors under PEFT's names (``Role.TUNER``: saved
``<module>.<param>``, in-model ``<module>.<param>.<adapter>``), and every LoRA-only route refuses it by name.

* SHiRA: ``shira_weight`` (n values) and ``shira_indices`` ((2, n) int32: row, column of an (out, in) weight).
  PEFT keeps the indices in a plain dict, so its in-model state dict has none: an unmerged checkpoint without
  them gets the mask PEFT's ``random_mask`` draws from ``random_seed`` (``mask_type: random``), presented as
  the tensor ``<module>.shira_indices.<adapter>`` (so a split writes it, as PEFT's save does); attach writes it
  beside ``shira_weight`` (a mask of another kind would otherwise be lost).
* FourierFT: ``fourierft_spectrum`` (n values); the places are drawn from ``random_loc_seed`` by the merge.

Neither stores its layer's width: an adapter's modules have in/out features 0 until a merge reads the base.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import AdapterConfig
from ..errors import AdapterError, UnsupportedError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from ..io.safetensors_format import TensorInfo
from ..io.sources import TensorSource
from .peft_keys import PEFT_PREFIX
from .vera import config_of_type, one_adapter, sort_rest

if TYPE_CHECKING:
    import torch

# tuner -> (peft_type, its word in messages, its parameters per module)
TUNERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "shira": ("SHIRA", "SHiRA", ("shira_weight", "shira_indices")),
    "fourierft": ("FOURIERFT", "FourierFT", ("fourierft_spectrum",)),
}
WORDS = {t: w for t, (_, w, _) in TUNERS.items()}
_LORA_KEYS = ("r", "target_modules", "modules_to_save", "fan_in_fan_out", "peft_type", "base_model_name_or_path")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(data: dict[str, Any], where: Any, key: str, ok: bool, want: str) -> None:
    if not ok:
        raise AdapterError(f"{key} is {data.get(key)!r}: PEFT's is {want}", path=where, tensor=key)


class GeneratedSource(TensorSource):
    """Tensors computed, not stored (SHiRA's mask of an in-model state dict): read whole on first use."""

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}
        self._make: dict[str, Callable[[], torch.Tensor]] = {}
        self._held: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def add(self, info: TensorInfo, make: Callable[[], torch.Tensor]) -> TensorInfo:
        self._make[info.name] = make
        self.path = info.file
        return TensorInfo(info.name, info.dtype_name, info.shape, info.file, 0, info.nbytes, self)

    def infos(self) -> dict[str, TensorInfo]:
        return {}

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        import torch

        with self._lock:
            if info.name not in self._held:
                self._held[info.name] = self._make[info.name]().contiguous().reshape(-1).view(torch.uint8)
            piece = self._held[info.name][start : start + nbytes]
        return piece.clone() if buf is None else buf.copy_(piece)


class AdditiveDialect:
    """SHiRA or FourierFT checkpoints: claimed by their tensors' names or an adapter_config.json of their type."""

    def __init__(self, tuner: str) -> None:
        self.tuner = tuner
        self.peft_type, self.word, self.params = TUNERS[tuner]
        self.name = tuner
        names = "|".join(self.params)
        self._key = re.compile(rf"^(?P<mod>.+)\.(?P<param>{names})(?:\.(?P<name>(?!weight$|bias$)[^.]+))?$", re.DOTALL)

    def claims(self, ck: Checkpoint) -> bool:
        if any(self._key.fullmatch(k) for k in ck.tensors):
            return True
        return config_of_type(ck, self.peft_type) is not None

    def read(self, ck: Checkpoint) -> Inventory:
        data = config_of_type(ck, self.peft_type)
        where = ck.adapter_config_path or ck.root
        if data is None:
            raise AdapterError(
                f"{self.word} tensors ({', '.join(self.params)}) without an adapter_config.json saying peft_type "
                f"{self.peft_type}",
                path=where,
                hint=f"put the adapter_config.json PEFT saved with this {self.word} adapter beside its weights",
            )
        self._check_config(data, where)
        cfg = AdapterConfig.from_dict({k: data[k] for k in _LORA_KEYS if k in data}, source=str(where))
        cfg.raw, cfg.peft_type = dict(data), self.peft_type
        fallback = ck.adapter_name or DEFAULT_ADAPTER
        parts: dict[tuple[str, str], dict[str, str]] = {}
        rest: list[str] = []
        in_model = any((m := self._key.fullmatch(k)) and m["name"] for k in ck.tensors)
        for k in ck.tensors:
            m = self._key.fullmatch(k)
            if m and bool(m["name"]) == in_model:
                parts.setdefault((m["name"] or fallback, m["mod"].removeprefix(PEFT_PREFIX)), {})[m["param"]] = k
            else:
                rest.append(k)
        if not parts:
            raise AdapterError(
                f"adapter_config.json says {self.word}, but no {'/'.join(self.params)} tensors are here", path=where
            )
        one_adapter(ck, parts, self.word)
        inv = Inventory(
            form="unmerged" if in_model else "adapter",
            dialect=self.name,
            prefixed=any(k.startswith(PEFT_PREFIX) for k in ck.tensors),
        )
        sort_rest(ck, inv, rest, fallback, f"a {self.word} checkpoint: {self.word}'s are {', '.join(self.params)}")
        made = GeneratedSource()
        for (ad, mod), keys in sorted(parts.items()):
            inv.lora.setdefault(ad, {})[mod] = self._module(ck, inv, data, ad, mod, keys, made)
        ad = next(iter(inv.lora))
        inv.configs[ad] = cfg
        inv.tuner[ad] = {"peft_type": self.peft_type, **self._summary(data)}
        return inv

    # -- per tuner -------------------------------------------------------------------------------------------
    def _check_config(self, data: dict[str, Any], where: Any) -> None:
        if self.tuner == "shira":
            _check(data, where, "r", _is_int(data.get("r", 32)) and data.get("r", 32) > 0, "a positive integer")
            seed = data.get("random_seed")
            _check(data, where, "random_seed", seed is None or _is_int(seed), "an integer or null")
        else:
            n = data.get("n_frequency", 1000)
            _check(data, where, "n_frequency", _is_int(n) and n > 0, "a positive integer")
            s = data.get("scaling", 150.0)
            ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
            _check(data, where, "scaling", ok, "a finite number")
            _check(data, where, "random_loc_seed", _is_int(data.get("random_loc_seed", 777)), "an integer")
            pat = data.get("n_frequency_pattern") or {}
            ok = isinstance(pat, dict) and all(_is_int(v) and v > 0 for v in pat.values())
            _check(data, where, "n_frequency_pattern", ok, "an object of positive integers")

    def _summary(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.tuner == "shira":
            return {
                "r": data.get("r", 32),
                "mask_type": data.get("mask_type", "random"),
                "random_seed": data.get("random_seed"),
            }
        keys = ("n_frequency", "scaling", "random_loc_seed", "n_frequency_pattern")
        defaults = {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777, "n_frequency_pattern": {}}
        return {k: data.get(k, defaults[k]) for k in keys}

    def _module(
        self,
        ck: Checkpoint,
        inv: Inventory,
        data: dict[str, Any],
        ad: str,
        mod: str,
        keys: dict[str, str],
        made: GeneratedSource,
    ) -> LoraModule:
        main = keys.get(self.params[0])
        if main is None:
            raise AdapterError(
                f"{self.word} module {mod}: {self.params[0]} is missing", path=ck.root, tensor=next(iter(keys.values()))
            )
        info = ck.info(main)
        if not info.is_float or len(info.shape) != 1 or info.shape[0] == 0:
            raise AdapterError(
                f"{self.word} module {mod}: {self.params[0]} of shape {list(info.shape)} ({info.dtype_name}): PEFT's "
                "is a non-empty 1-D floating-point vector",
                path=info.file,
                tensor=main,
            )
        n = info.shape[0]
        out_f = in_f = 0
        base = inv.base.get(f"{mod}.weight")
        if inv.form == "unmerged" and base is not None and len(ck.info(base).shape) == 2:
            out_f, in_f = ck.info(base).shape
            if data.get("fan_in_fan_out"):
                out_f, in_f = in_f, out_f
        if self.tuner == "shira" and "shira_indices" not in keys:
            keys = dict(keys, shira_indices=self._draw_mask(ck, inv, data, ad, mod, main, (out_f, in_f), made))
        scaling = 1.0 if self.tuner == "shira" else float(data.get("scaling", 150.0))
        return LoraModule(
            mod,
            ad,
            "linear",
            main,
            main,  # (a_key and b_key: the trained tensor; SHiRA's integer indices are no factor to check as one)
            int(data.get("r", 32)) if self.tuner == "shira" else n,
            in_f,
            out_f,
            scaling=scaling,
            tuner=self.tuner,
            factors={p: keys[p] for p in self.params if p in keys},
            factor_params=n,
            tuner_args=self._args(data, mod),
        )

    def _args(self, data: dict[str, Any], mod: str) -> dict[str, Any]:
        if self.tuner == "shira":
            return {"r": int(data.get("r", 32))}
        keys = ("n_frequency", "random_loc_seed", "n_frequency_pattern")
        return {k: data[k] for k in keys if k in data}

    def _draw_mask(
        self,
        ck: Checkpoint,
        inv: Inventory,
        data: dict[str, Any],
        ad: str,
        mod: str,
        main: str,
        shape: tuple[int, int],
        made: GeneratedSource,
    ) -> str:
        """The (2, n) indices PEFT's ``random_mask`` gives this module, as a computed tensor under the in-model
        name PEFT's save uses; an adapter file (or a mask of another kind) must hold them."""
        if inv.form != "unmerged" or data.get("mask_type", "random") != "random" or not shape[0]:
            raise AdapterError(
                f"SHiRA module {mod}: shira_indices is missing"
                + ("" if inv.form != "unmerged" else " and the mask is not PEFT's random one (mask_type random)"),
                path=ck.root,
                tensor=main,
            )
        from ..additive_math import shira_random_indices

        r, seed = int(data.get("r", 32)), data.get("random_seed")
        n = r * (shape[0] + shape[1])
        if n > shape[0] * shape[1]:
            raise UnsupportedError(
                f"SHiRA module {mod}: r={r} asks for {n} entries of a {list(shape)} weight; PEFT refuses it",
                path=ck.root,
                tensor=main,
            )
        name = f"{PEFT_PREFIX if inv.prefixed else ''}{mod}.shira_indices.{ad}"
        stub = TensorInfo(name, "I32", (2, n), ck.info(main).file, 0, 8 * n)
        ck.tensors[name] = made.add(stub, lambda: shira_random_indices(shape[0], shape[1], r, seed))
        return name

"""PEFT's newer additive tuners: SHiRA (``peft_type: SHIRA``), FourierFT (``FOURIERFT``), VB-LoRA (``VBLORA``),
DeLoRA (``DELORA``), C3A (``C3A``) and RandLoRA (``RANDLORA``).  Each module is a :class:`LoraModule` with ``tuner`` set and its tensors by PEFT's parameter
name in ``factors``; the merge builds its ΔW (``routes/additive_terms.py``, math in
``additive_math.py``), split and attach move those tensors under PEFT's names (``Role.TUNER``: saved
``<module>.<param>``, in-model ``<module>.<param>.<adapter>``), and every LoRA-only route refuses it by name.

* SHiRA: ``shira_weight`` (n values) and ``shira_indices`` ((2, n) int32: row, column of an (out, in) weight).
  PEFT keeps the indices in a plain dict, so its in-model state dict has none: an unmerged checkpoint without
  them gets the mask PEFT's ``random_mask`` draws from ``random_seed`` (``mask_type: random``), presented as
  the tensor ``<module>.shira_indices.<adapter>`` (so a split writes it, as PEFT's save does); attach writes it
  beside ``shira_weight`` (a mask of another kind would otherwise be lost).
* FourierFT: ``fourierft_spectrum`` (n values); the places are drawn from ``random_loc_seed`` by the merge.
* VB-LoRA: ``vblora_logits_A``/``_B`` per layer (or a ``save_only_topk_weights`` file's ``_topk_indices`` and
  ``_topk_weights``) and the bank ``base_model.vblora_vector_bank`` shared by every layer (kept in
  ``Inventory.native[adapter][""]`` so split and attach write it where PEFT does; PEFT's in-model state dict
  also holds a copy under every layer).  A top-k file is read as PEFT loads it: the logits rebuilt (computed
  tensors), which attach writes; a split of an unmerged checkpoint whose config says ``save_only_topk_weights``
  writes the top-k PEFT's save takes.

* DeLoRA: ``delora_A``, ``delora_B``, ``delora_lambda`` and the base's column norms ``delora_w_norm``;
  C3A: ``c3a_kernel``.  Each module's tensors as they are.
* RandLoRA: ``randlora_lambda``/``randlora_gamma`` per layer and the random bases ``base_model.randlora_A``/``_B``
  shared as VB-LoRA's bank is (saved without them: refused by name, as VeRA's projections are).

SHiRA, FourierFT, RandLoRA, MiSS and RoAd do not store their layer's width: an adapter's modules have in/out features 0 (their
merge reads it from the base; ``report`` takes it from the base it is given, ``costs._base_shapes``).
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
from ..io.safetensors_format import DTYPE_TABLE, TensorInfo
from ..io.sources import TensorSource
from .peft_keys import PEFT_PREFIX
from .vera import config_of_type, one_adapter, sort_rest

if TYPE_CHECKING:
    import torch

# tuner -> (peft_type, its word in messages, its parameters per module)
TUNERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "shira": ("SHIRA", "SHiRA", ("shira_weight", "shira_indices")),
    "fourierft": ("FOURIERFT", "FourierFT", ("fourierft_spectrum",)),
    "randlora": ("RANDLORA", "RandLoRA", ("randlora_lambda", "randlora_gamma")),
    "delora": ("DELORA", "DeLoRA", ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")),
    "c3a": ("C3A", "C3A", ("c3a_kernel",)),
    "miss": ("MISS", "MiSS", ("miss_block",)),
    "road": ("ROAD", "RoAd", ("road_theta", "road_alpha")),
    "vblora": (
        "VBLORA",
        "VB-LoRA",
        ("vblora_logits_A", "vblora_logits_B")
        + tuple(f"vblora_logits_{s}_topk_{t}" for s in "AB" for t in ("indices", "weights")),
    ),
}
BANK = "vblora_vector_bank"  # VB-LoRA's bank, shared by every layer: base_model.vblora_vector_bank[.<adapter>]
# tensors a tuner shares between its layers: base_model.<role>[.<adapter>] (PEFT's in-model state dict also holds a
# copy under every layer, <module>.<role>.<adapter>, which attach writes again from the shared one)
SHARED = {"vblora": (BANK,), "randlora": ("randlora_A", "randlora_B")}
ROAD_SIZES = {"road_1": 1, "road_2": 2, "road_4": 4}  # RoAd's θ (and α) numbers per output row, times 2
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
        roles = "|".join(SHARED.get(tuner, ("(?!)",)))
        self._shared = re.compile(rf"^(?:base_model\.)?(?P<role>{roles})(?:\.(?P<name>[^.]+))?$", re.DOTALL)
        self._copy = re.compile(rf"^.+\.(?:{roles})\.[^.]+$", re.DOTALL)
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
        shared: dict[str, dict[str, str]] = {}
        in_model = any((m := self._key.fullmatch(k)) and m["name"] for k in ck.tensors)
        for k in ck.tensors:
            if b := self._shared.fullmatch(k):
                shared.setdefault(b["name"] or fallback, {})[b["role"]] = k
                continue
            if in_model and self._copy.fullmatch(k):
                continue  # written again by attach from the shared one
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
        ours = self._own_shared(ck, data, shared, next(iter(parts))[0], where)
        banks = {a: d[BANK] for a, d in shared.items() if BANK in d}
        for (ad, mod), keys in sorted(parts.items()):
            if self.tuner == "vblora":
                inv.lora.setdefault(ad, {})[mod] = self._vblora(ck, inv, data, ad, mod, keys, banks, made, not inv.lora)
            elif self.tuner == "randlora":
                inv.lora.setdefault(ad, {})[mod] = self._randlora(ck, inv, data, ad, mod, keys, ours)
            else:
                inv.lora.setdefault(ad, {})[mod] = self._module(ck, inv, data, ad, mod, keys, made)
        ad = next(iter(inv.lora))
        if self.tuner == "vblora":
            inv.native[ad] = {"": {BANK: next(iter(inv.lora[ad].values())).tuner_args["bank"]}}
        elif ours:
            inv.native[ad] = {"": dict(ours)}
        inv.configs[ad] = cfg
        inv.tuner[ad] = {"peft_type": self.peft_type, **self._summary(data)}
        return inv

    # -- per tuner -------------------------------------------------------------------------------------------
    def _check_config(self, data: dict[str, Any], where: Any) -> None:
        if self.tuner == "randlora":
            _check(data, where, "r", _is_int(data.get("r", 32)) and data.get("r", 32) > 0, "a positive integer")
            a = data.get("randlora_alpha", 640)
            ok = isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
            _check(data, where, "randlora_alpha", ok, "a finite number")
        elif self.tuner in ("delora", "c3a"):
            key, default = ("r", 8) if self.tuner == "delora" else ("block_size", 256)
            v = data.get(key, default)
            _check(data, where, key, _is_int(v) and v > 0, "a positive integer")
        elif self.tuner == "vblora":
            for key, default in (("r", 4), ("topk", 2), ("num_vectors", 256), ("vector_length", 256)):
                v = data.get(key, default)
                _check(data, where, key, _is_int(v) and v > 0, "a positive integer")
        elif self.tuner == "road":
            _check(data, where, "variant", data.get("variant", "road_1") in ROAD_SIZES, "road_1, road_2 or road_4")
            g = data.get("group_size", 64)
            _check(data, where, "group_size", _is_int(g) and g > 0 and g % 2 == 0, "a positive even integer")
        elif self.tuner == "miss":
            _check(data, where, "r", _is_int(data.get("r", 64)) and data.get("r", 64) > 0, "a positive integer")
            mini = data.get("mini_r", 1)
            _check(data, where, "mini_r", _is_int(mini) and mini > 0, "a positive integer")
            init = data.get("init_weights", True)
            _check(
                data,
                where,
                "init_weights",
                isinstance(init, bool) or init in ("bat", "mini"),
                'a bool, "bat" or "mini"',
            )
        elif self.tuner == "shira":
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
        if self.tuner == "randlora":
            rl: dict[str, Any] = {"r": 32, "randlora_alpha": 640, "projection_prng_key": 0, "sparse": False}
            return {k: data.get(k, d) for k, d in {**rl, "very_sparse": False}.items()}
        if self.tuner == "delora":
            return {k: data.get(k, d) for k, d in {"r": 8, "delora_lambda": 15, "rank_pattern": {}}.items()}
        if self.tuner == "road":
            return {k: data.get(k, d) for k, d in {"variant": "road_1", "group_size": 64}.items()}
        if self.tuner == "miss":
            return {k: data.get(k, d) for k, d in {"r": 64, "init_weights": True, "mini_r": 1}.items()}
        if self.tuner == "c3a":
            return {k: data.get(k, d) for k, d in {"block_size": 256, "block_size_pattern": {}}.items()}
        if self.tuner == "vblora":
            vb: dict[str, Any] = {"r": 4, "topk": 2, "num_vectors": 256, "vector_length": 256}
            return {k: data.get(k, d) for k, d in {**vb, "save_only_topk_weights": False}.items()}
        if self.tuner == "shira":
            return {
                "r": data.get("r", 32),
                "mask_type": data.get("mask_type", "random"),
                "random_seed": data.get("random_seed"),
            }
        fourier: dict[str, Any] = {
            "n_frequency": 1000,
            "scaling": 150.0,
            "random_loc_seed": 777,
            "n_frequency_pattern": {},
        }
        return {k: data.get(k, d) for k, d in fourier.items()}

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
        if self.tuner in ("delora", "c3a"):
            return self._factored(ck, ad, mod, keys, main)
        if self.tuner == "miss":
            return self._miss(ck, data, ad, mod, main)
        if self.tuner == "road":
            return self._road(ck, data, ad, mod, keys)
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

    def _vblora(
        self,
        ck: Checkpoint,
        inv: Inventory,
        data: dict[str, Any],
        ad: str,
        mod: str,
        keys: dict[str, str],
        banks: dict[str, str],
        made: GeneratedSource,
        first: bool,
    ) -> LoraModule:
        """A VB-LoRA module: full logits ``vblora_logits_A`` (r, in/L, V) and ``_B`` (out/L, r, V), or a
        ``save_only_topk_weights`` file's top-k ``_indices`` (…, k) and first k - 1 ``_weights``; checked
        against each other, the bank (V, L) and the config's ``topk``.  The bank's parameters count once (on the
        adapter's first module), as PEFT's trainable count has them."""
        any_key = next(iter(keys.values()))

        def bad(what: str, key: str = any_key) -> AdapterError:
            return AdapterError(f"VB-LoRA module {mod}: {what}", path=ck.root, tensor=key)

        bank = banks.get(ad) or banks.get(DEFAULT_ADAPTER) or next(iter(banks.values()), None)
        if bank is None:
            raise bad(f"{BANK} (the bank every layer's vectors come from) is missing")
        binfo = ck.info(bank)
        if not binfo.is_float or len(binfo.shape) != 2 or 0 in binfo.shape:
            raise AdapterError(
                f"{BANK} of shape {list(binfo.shape)} ({binfo.dtype_name}): PEFT's is (num_vectors, vector_length) "
                "floating-point",
                path=binfo.file,
                tensor=bank,
            )
        n_vec, length = binfo.shape
        k = int(data.get("topk", 2))
        shapes: dict[str, tuple[int, ...]] = {}
        topk = "vblora_logits_A" not in keys and "vblora_logits_B" not in keys
        for side in "AB":
            names: tuple[str, ...] = (
                (f"vblora_logits_{side}_topk_indices", f"vblora_logits_{side}_topk_weights")
                if topk
                else (f"vblora_logits_{side}",)
            )
            for n in names:
                if n not in keys:
                    raise bad(f"{n} is missing")
                info = ck.info(keys[n])
                integer = n.endswith("indices")
                if integer == info.is_float or len(info.shape) != 3 or 0 in info.shape:
                    kind = "an integer" if integer else "a floating-point"
                    raise bad(
                        f"{n} of shape {list(info.shape)} ({info.dtype_name}): PEFT's is {kind} 3-D tensor", keys[n]
                    )
            lead = ck.info(keys[names[0]]).shape
            want = (*lead[:2], k) if topk else (*lead[:2], n_vec)
            if tuple(lead) != want:
                raise bad(
                    f"{names[0]} has shape {list(lead)}, {list(want)} with topk={k} and a bank of {n_vec} vectors",
                    keys[names[0]],
                )
            if topk and tuple(ck.info(keys[names[1]]).shape) != (*lead[:2], k - 1):
                raise bad(
                    f"{names[1]} has shape {list(ck.info(keys[names[1]]).shape)}, PEFT's is {[*lead[:2], k - 1]}",
                    keys[names[1]],
                )
            shapes[side] = tuple(lead)
        r, r_b = shapes["A"][0], shapes["B"][1]
        if r != r_b:
            a_key = keys["vblora_logits_A" if not topk else "vblora_logits_A_topk_indices"]
            raise bad(f"the A logits have rank {r}, the B logits {r_b}", a_key)
        in_f, out_f = shapes["A"][1] * length, shapes["B"][0] * length
        params = (shapes["A"][0] * shapes["A"][1] + shapes["B"][0] * shapes["B"][1]) * n_vec
        main = keys["vblora_logits_A" if not topk else "vblora_logits_A_topk_weights"]
        factors = {p: keys[p] for p in self.params if p in keys}
        prefix = PEFT_PREFIX if inv.prefixed else ""
        if topk:  # PEFT's loading: the logits rebuilt from the top-k (what its in-model state dict then holds)
            factors = {}
            for side in "AB":
                name = f"{prefix}{mod}.vblora_logits_{side}"
                ik, wk = keys[f"vblora_logits_{side}_topk_indices"], keys[f"vblora_logits_{side}_topk_weights"]
                info = TensorInfo(
                    name,
                    "F32",
                    (*shapes[side][:2], n_vec),
                    ck.info(main).file,
                    0,
                    4 * n_vec * math.prod(shapes[side][:2]),
                )
                ck.tensors[name] = made.add(info, _logits_from_topk(ck, ik, wk, n_vec, f"VB-LoRA module {mod}"))
                factors[f"vblora_logits_{side}"] = name
        elif data.get("save_only_topk_weights") and inv.form == "unmerged":  # PEFT's save: the top-k of the logits
            factors = {}
            for side in "AB":
                lk = keys[f"vblora_logits_{side}"]
                for part in ("indices", "weights"):
                    name = f"{prefix}{mod}.vblora_logits_{side}_topk_{part}.{ad}"
                    lead = (*shapes[side][:2], k if part == "indices" else k - 1)
                    dtype = _index_dtype(n_vec) if part == "indices" else "F32"
                    size = math.prod(lead) * (DTYPE_TABLE[dtype][0])
                    info = TensorInfo(name, dtype, lead, ck.info(lk).file, 0, size)
                    ck.tensors[name] = made.add(info, _topk_of_logits(ck, lk, k, part, dtype))
                    factors[f"vblora_logits_{side}_topk_{part}"] = name
        return LoraModule(
            mod,
            ad,
            "linear",
            main,
            keys["vblora_logits_B" if not topk else "vblora_logits_B_topk_weights"],
            r,
            in_f,
            out_f,
            scaling=1.0,
            tuner="vblora",
            factors=factors,
            factor_params=params + (binfo.numel if first else 0),
            tuner_args={"topk": k, "bank": bank},
        )

    def _miss(self, ck: Checkpoint, data: dict[str, Any], ad: str, mod: str, main: str) -> LoraModule:
        """A MiSS module: ``miss_block`` (r, out) (PEFT's default), (r, mini_r) (``init_weights: mini``) or
        (out/r, r, r) (``bat``), checked against the config's r and mini_r (its fit to the base is the merge's).
        The layer's widths are not all stored (in/out features 0, taken from the base as SHiRA's)."""
        info = ck.info(main)
        variant = data.get("init_weights", True)
        variant = variant if variant in ("bat", "mini") else "miss"
        r, mini = int(data.get("r", 64)), int(data.get("mini_r", 1))
        shape = tuple(info.shape)
        want = {"bat": "(out/r, r, r)", "mini": f"(r, mini_r) = ({r}, {mini})", "miss": f"(r, out) with r={r}"}[variant]
        if variant == "bat":
            ok = len(shape) == 3 and shape[1] == shape[2] == r and shape[0] > 0
        else:
            ok = len(shape) == 2 and shape[0] == r and (shape[1] == mini if variant == "mini" else shape[1] > 0)
        if not info.is_float or not ok:
            raise AdapterError(
                f"MiSS module {mod}: miss_block of shape {list(shape)} ({info.dtype_name}): PEFT's with init_weights "
                f"{data.get('init_weights', True)!r} is a floating-point {want}",
                path=info.file,
                tensor=main,
            )
        return LoraModule(
            mod,
            ad,
            "linear",
            main,
            main,
            r,
            0,
            0,
            scaling=1.0,
            tuner="miss",
            factors={"miss_block": main},
            factor_params=info.numel,
            tuner_args={"variant": variant, "r": r, "mini_r": mini},
        )

    def _road(self, ck: Checkpoint, data: dict[str, Any], ad: str, mod: str, keys: dict[str, str]) -> LoraModule:
        """A RoAd module: ``road_theta`` and ``road_alpha``, 1-D floating-point, as long as each other: out/2
        (road_1), out (road_2) or 2·out (road_4) numbers, so the layer's output width is theirs (``tuner_args["out"]``; its
        fit to ``group_size`` and the base is the merge's; in/out features 0, bound from the base as MiSS's)."""
        any_key = next(iter(keys.values()))
        for p in self.params:
            if p not in keys:
                raise AdapterError(f"RoAd module {mod}: {p} is missing", path=ck.root, tensor=any_key)
            info = ck.info(keys[p])
            if not info.is_float or len(info.shape) != 1 or info.shape[0] == 0:
                raise AdapterError(
                    f"RoAd module {mod}: {p} of shape {list(info.shape)} ({info.dtype_name}): PEFT's is a non-empty "
                    "1-D floating-point vector",
                    path=info.file,
                    tensor=keys[p],
                )
        n, n_a = ck.info(keys["road_theta"]).shape[0], ck.info(keys["road_alpha"]).shape[0]
        variant, g = str(data.get("variant", "road_1")), int(data.get("group_size", 64))
        per = ROAD_SIZES[variant]  # numbers per output row, times 2
        if n != n_a or (2 * n) % per:
            raise AdapterError(
                f"RoAd module {mod}: road_theta has {n} numbers and road_alpha {n_a}; PEFT's {variant} has "
                f"{per // 2 if per > 1 else '1/2'} of each per output row",
                path=ck.root,
                tensor=keys["road_alpha"],
            )
        return LoraModule(
            mod,
            ad,
            "linear",
            keys["road_theta"],
            keys["road_alpha"],
            g,
            0,
            0,
            scaling=1.0,
            tuner="road",
            factors={p: keys[p] for p in self.params},
            factor_params=2 * n,
            tuner_args={"variant": variant, "group_size": g, "rows_mixed": g, "out": 2 * n // per},
        )

    def _own_shared(
        self, ck: Checkpoint, data: dict[str, Any], shared: dict[str, dict[str, str]], ad: str, where: Any
    ) -> dict[str, str]:
        """RandLoRA's shared random bases of adapter ``ad``: both there, 3-D floating-point, ``r`` as the config
        says; refused by name when the adapter was saved without them (as VeRA's: PEFT regenerates them with
        torch's generator)."""
        if self.tuner != "randlora":
            return {}
        got = shared.get(ad) or shared.get(DEFAULT_ADAPTER) or next(iter(shared.values()), {})
        if data.get("save_projection") is False or not got:
            raise UnsupportedError(
                "RandLoRA adapter saved without its random bases (save_projection false, no randlora_A/randlora_B): "
                "PEFT regenerates them from projection_prng_key with torch's generator over the model's largest layers",
                path=where,
                hint="save the adapter with save_projection=True (PEFT's default)",
            )
        r = int(data.get("r", 32))
        for role in ("randlora_A", "randlora_B"):
            if role not in got:
                have = next(iter(got.values()))
                raise AdapterError(f"{role} is missing beside {have}", path=ck.root, tensor=have)
            info = ck.info(got[role])
            rank = info.shape[0] if role == "randlora_A" else (info.shape[-1] if info.shape else 0)
            if not info.is_float or len(info.shape) != 3 or rank != r or 0 in info.shape:
                raise AdapterError(
                    f"{role} of shape {list(info.shape)} ({info.dtype_name}): PEFT's is a 3-D floating-point basis "
                    f"with r={r} {'rows' if role == 'randlora_A' else 'in its last axis'}",
                    path=info.file,
                    tensor=got[role],
                )
        return dict(got)

    def _randlora(
        self,
        ck: Checkpoint,
        inv: Inventory,
        data: dict[str, Any],
        ad: str,
        mod: str,
        keys: dict[str, str],
        shared: dict[str, str],
    ) -> LoraModule:
        """A RandLoRA module: ``randlora_lambda`` (r, bases) and ``randlora_gamma`` (bases, min(in, out)), checked
        against each other and PEFT's count of bases, ⌈min(in, out) / r⌉ (their fit to the base is the merge's)."""
        any_key = next(iter(keys.values()))
        for p in self.params:
            if p not in keys:
                raise AdapterError(f"RandLoRA module {mod}: {p} is missing", path=ck.root, tensor=any_key)
            info = ck.info(keys[p])
            if not info.is_float or len(info.shape) != 2 or 0 in info.shape:
                raise AdapterError(
                    f"RandLoRA module {mod}: {p} of shape {list(info.shape)} ({info.dtype_name}): PEFT's is a 2-D "
                    "floating-point matrix",
                    path=info.file,
                    tensor=keys[p],
                )
        (r, nb), (nb_g, min_dim) = ck.info(keys["randlora_lambda"]).shape, ck.info(keys["randlora_gamma"]).shape
        want = -(-min_dim // r)
        if r != int(data.get("r", 32)) or nb != nb_g or nb != want:
            raise AdapterError(
                f"RandLoRA module {mod}: randlora_lambda {[r, nb]} and randlora_gamma {[nb_g, min_dim]} do not fit "
                f"r={data.get('r', 32)} and ⌈{min_dim}/r⌉ = {want} bases",
                path=ck.root,
                tensor=keys["randlora_lambda"],
            )
        out_f = in_f = 0
        base = inv.base.get(f"{mod}.weight")
        if inv.form == "unmerged" and base is not None and len(ck.info(base).shape) == 2:
            out_f, in_f = ck.info(base).shape
            if data.get("fan_in_fan_out"):
                out_f, in_f = in_f, out_f
        return LoraModule(
            mod,
            ad,
            "linear",
            keys["randlora_lambda"],
            keys["randlora_gamma"],
            r,
            in_f,
            out_f,
            scaling=float(data.get("randlora_alpha", 640)) / r,
            tuner="randlora",
            factors={p: keys[p] for p in self.params},
            factor_params=r * nb + nb_g * min_dim,
            tuner_args={"A": shared["randlora_A"], "B": shared["randlora_B"], "bases": nb, "min_dim": min_dim},
        )

    def _factored(self, ck: Checkpoint, ad: str, mod: str, keys: dict[str, str], main: str) -> LoraModule:
        """A DeLoRA module (``delora_A`` (r, in), ``delora_B`` (out, r), ``delora_lambda`` (1), the base's column
        norms ``delora_w_norm`` (in), a buffer: not trained) or a C3A one (``c3a_kernel`` (out/b, in/b, b)), its
        tensors checked against each other (their fit to the base weight is the merge's)."""

        def bad(what: str, key: str) -> AdapterError:
            return AdapterError(f"{self.word} module {mod}: {what}", path=ck.root, tensor=key)

        for p in self.params:
            if p not in keys:
                raise bad(f"{p} is missing", main)
        shapes = {p: tuple(ck.info(keys[p]).shape) for p in self.params}
        for p in self.params:
            info = ck.info(keys[p])
            dims = {"delora_A": 2, "delora_B": 2, "delora_lambda": 1, "delora_w_norm": 1, "c3a_kernel": 3}[p]
            if not info.is_float or len(info.shape) != dims or 0 in info.shape:
                raise bad(
                    f"{p} of shape {list(info.shape)} ({info.dtype_name}): PEFT's is {dims}-D floating-point", keys[p]
                )
        if self.tuner == "c3a":
            m_b, n_b, b = shapes["c3a_kernel"]
            rank, in_f, out_f, params = b, n_b * b, m_b * b, m_b * n_b * b
            args: dict[str, Any] = {"block_size": b}
        else:
            (r, in_f), (out_f, r_b) = shapes["delora_A"], shapes["delora_B"]
            if r_b != r:
                raise bad(
                    f"delora_A {list(shapes['delora_A'])} and delora_B {list(shapes['delora_B'])} do not multiply",
                    keys["delora_B"],
                )
            if shapes["delora_lambda"] != (1,):
                raise bad(
                    f"delora_lambda has shape {list(shapes['delora_lambda'])}, PEFT's is [1]", keys["delora_lambda"]
                )
            if shapes["delora_w_norm"] != (in_f,):
                raise bad(
                    f"delora_w_norm has shape {list(shapes['delora_w_norm'])}; beside delora_A {list(shapes['delora_A'])} "
                    f"PEFT's is [{in_f}]",
                    keys["delora_w_norm"],
                )
            rank, params, args = r, r * (in_f + out_f) + 1, {}
        return LoraModule(
            mod,
            ad,
            "linear",
            main,
            keys.get("delora_B", main),
            rank,
            in_f,
            out_f,
            scaling=1.0,
            tuner=self.tuner,
            factors={p: keys[p] for p in self.params},
            factor_params=params,
            tuner_args=args,
        )


def _index_dtype(n_vec: int) -> str:
    """PEFT's ``_get_adapter_state_dict``: the smallest integer type that holds a bank index."""
    return "U8" if n_vec < 2**8 else "I16" if n_vec < 2**15 else "I32" if n_vec < 2**31 else "I64"


def _logits_from_topk(ck: Checkpoint, ik: str, wk: str, n_vec: int, what: str) -> Callable[[], torch.Tensor]:
    """PEFT's ``_remap_adapter_state_dict_for_load``: the k - 1 weights and 1 minus their sum, their logarithms
    at the top-k places of a row of -inf; the indices and weights checked first (one error naming the tensor)."""

    def make() -> torch.Tensor:
        import torch

        idx = ck.read(ik).to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_vec):
            raise AdapterError(
                f"{what}: top-k indices out of range for a bank of {n_vec} vectors", path=ck.root, tensor=ik
            )
        w = ck.read(wk)
        if not bool(torch.isfinite(w).all()):
            raise AdapterError(f"{what}: NaN or Inf among the top-k weights", path=ck.root, tensor=wk)
        w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
        out = torch.zeros([*w.shape[:-1], n_vec]).fill_(float("-inf"))
        return out.scatter(-1, idx, torch.log(w).to(out.dtype))

    return make


def _topk_of_logits(ck: Checkpoint, lk: str, k: int, part: str, dtype: str) -> Callable[[], torch.Tensor]:
    """PEFT's save with ``save_only_topk_weights``: ``logits.topk(k)``'s indices in ``dtype``, or the softmax of
    the top logits without its last column."""

    def make() -> torch.Tensor:
        import torch

        from ..io.safetensors_format import torch_dtype

        logits, indices = ck.read(lk).topk(k)
        if part == "indices":
            return indices.to(torch_dtype(dtype))
        return torch.softmax(logits, dim=-1)[:, :, :-1].contiguous()

    return make

"""``adapter_config.json`` -> per-module rank, alpha and scaling, resolved as PEFT does.

PEFT resolves ``rank_pattern``/``alpha_pattern`` with ``re.match(rf"(.*\\.)?({key})$", name)``
over the pattern keys in dict order, the first match winning; ``scaling`` is
``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA.  We keep the same rule in one place.

The file comes from a stranger, so it is checked against a schema of types once, at load
(:func:`check_schema`), and the pattern keys — regular expressions that Python's backtracking
``re`` could take forever on — are compiled with ``re`` (so what PEFT refuses, we refuse) and
evaluated with the ``regex`` engine under a time limit per match and a budget per config.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterError, UnsupportedError
from .io.files import MAX_CONFIG_BYTES, load_json

# init_lora_weights values that change the *base* weights at init time: the saved adapter
# is relative to a residual base we do not have, so a plain merge would be wrong.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")
# dialects/ read the others than LoRA (adalora, vera, ia3, oft, boft, hra, additive)
SUPPORTED_PEFT_TYPES = (
    "LORA",
    "ADALORA",
    "VERA",
    "IA3",
    "OFT",
    "BOFT",
    "HRA",
    "SHIRA",
    "FOURIERFT",
    "VBLORA",
    "DELORA",
    "C3A",
    "RANDLORA",
    "MISS",
    "ROAD",
)
# PEFT's LyCORIS tuners: merged (their ΔW in tuner_math) and moved between forms, but no LoRA route converts them;
# their config says ``alpha`` where LoRA's says ``lora_alpha`` (scaling alpha / r, no rsLoRA)
TUNER_PEFT_TYPES = ("LOHA", "LOKR")


PATTERN_TIMEOUT_S = 2.0  # wall seconds for one key against one module name: real ones take microseconds
PATTERN_BUDGET_S = 10.0  # CPU seconds for every match of one config together
MAX_PATTERN_CHARS = 10_000
FP32_MAX = 3.4028234663852886e38
MAX_VERSION_CHARS = 64  # "0.19.1.dev0+g0123abcd": a version string longer than this is not one
_MAX_INT = 2**31  # ranks and token ids beyond this are not real


def _pattern(key: str, field_name: str, source: str | None) -> Any:
    """``(.*\\.)?(key)$`` compiled for the bounded engine, after ``re`` (PEFT's engine) accepts it."""
    import regex

    if len(key) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{field_name} key of {len(key)} characters (at most {MAX_PATTERN_CHARS})", path=source)
    text = rf"(.*\.)?({key})$"
    try:
        re.compile(text)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(
            f"{field_name} key {key[:80]!r} is not a valid regular expression ({exc})", path=source
        ) from None
    try:
        return regex.compile(text)
    except (regex.error, RecursionError, OverflowError) as exc:  # pragma: no cover - re accepted it
        raise AdapterError(f"{field_name} key {key[:80]!r} cannot be evaluated safely ({exc})", path=source) from None


_PLAIN_KEY = re.compile(r"[\w.]+")  # word characters and '.' (any character): a fixed-length pattern


_META = frozenset(".^$*+?{}[]|()\\")  # what re reads as other than itself when not escaped


def _literal(key: str) -> str | None:
    """The one text ``key`` matches when it is plain and escaped characters (``re.escape`` of a module
    path), else None (a wildcard, a class, a group, an escape like ``\\d`` or a back-reference)."""
    out, i = [], 0
    while i < len(key):
        c = key[i]
        if c == "\\":
            if i + 1 == len(key) or key[i + 1].isalnum():
                return None
            out.append(key[i + 1])
            i += 2
        elif c in _META:
            return None
        else:
            out.append(c)
            i += 1
    return "".join(out) or None


def _plain_match(key: str) -> Any:
    r"""For the keys real configs hold (module names and paths, escaped or not, or ``^`` + an escaped path,
    as :meth:`AdapterConfig.for_modules` writes hundreds of them), a string comparison that gives what
    ``re.match(rf"(.*\.)?({key})$", name)`` gives for a name without a newline; None for other keys.
    The pattern matches a fixed length, so only the name's tail of that length, on a dot boundary, can
    match it; thousands of keys cost string compares, not regex runs."""
    if key.startswith("^"):
        exact = _literal(key[1:])
        return None if exact is None else (lambda name: name == exact)
    lit = _literal(key)
    if lit is not None:
        tail = "." + lit
        return lambda name: name == lit or name.endswith(tail)
    if not _PLAIN_KEY.fullmatch(key):
        return None
    n = len(key)

    def match(name: str) -> bool:
        if len(name) < n or (len(name) > n and name[-n - 1] != "."):
            return False
        return all(k == c or k == "." for k, c in zip(key, name[-n:], strict=True))

    return match


class _Patterns:
    """The keys of one ``rank_pattern``/``alpha_pattern``, matched PEFT's way within a time bound."""

    def __init__(self, keys: list[str], field_name: str, source: str | None) -> None:
        self.field, self.source = field_name, source
        self.compiled = [
            (k, _plain_match(k), None if _plain_match(k) else _pattern(k, field_name, source)) for k in keys
        ]
        self.cache: dict[str, str | None] = {}
        self.spent = 0.0

    def first(self, module: str) -> str | None:
        """First key that matches the end of ``module`` on a dot boundary (PEFT's rule)."""
        if module in self.cache:
            return self.cache[module]
        found = None
        for key, plain, pat in self.compiled:
            if plain is not None and "\n" not in module:  # ('.' and '$' treat a newline apart: the regex does)
                if plain(module):
                    found = key
                    break
                continue
            pat = pat or _pattern(key, self.field, self.source)
            t0 = time.thread_time()
            try:
                hit = pat.match(module, timeout=PATTERN_TIMEOUT_S)
            except TimeoutError:
                raise AdapterError(
                    f"{self.field} key {key[:80]!r} takes more than {PATTERN_TIMEOUT_S:g} s to match module "
                    f"{module[:120]} (a regular expression that backtracks without end)",
                    path=self.source,
                    hint="PEFT matches these keys against every module name: use a plain module name or a "
                    "simple pattern",
                ) from None
            finally:
                self.spent += time.thread_time() - t0
            if self.spent > PATTERN_BUDGET_S:
                raise AdapterError(
                    f"{self.field}: matching its keys against the module names took more than "
                    f"{PATTERN_BUDGET_S:g} s of CPU",
                    path=self.source,
                    hint="use plain module names or simple patterns",
                )
            if hit:
                found = key
                break
        self.cache[module] = found
        return found


def _most_common(values: Any, default: Any) -> Any:
    """The value most modules share (ties: the smallest), as diffusers picks ``r`` and ``lora_alpha``."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return min(counts, key=lambda v: (-counts[v], v)) if counts else default


def pattern_key(pattern_keys: Any, module: str) -> str | None:
    """First pattern key that matches the end of ``module`` on a dot boundary (PEFT's rule), bounded."""
    return _Patterns(list(pattern_keys), "pattern", None).first(module)


# -- the schema ----------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_or_list(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(i) and 0 <= i < _MAX_INT for i in v)


def _alpha(v: Any) -> bool:
    """A number float32 holds: an int is compared exactly (``math.isfinite(10**400)`` raises OverflowError)."""
    return _is_number(v) and (isinstance(v, int) or math.isfinite(v)) and abs(v) <= FP32_MAX


def _rank(v: Any) -> bool:
    return _is_int(v) and 0 < v <= _MAX_INT


# key -> (check, what it must be); null always means "not set"
SCHEMA: dict[str, tuple[Any, str]] = {
    "r": (_rank, "a positive integer"),
    "lora_alpha": (_alpha, "a finite number that float32 can hold (|alpha| <= 3.4e38)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "use_qalora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_rank(x) for x in v.values()),
        "an object of pattern -> positive integer",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_alpha(x) for x in v.values()),
        "an object of pattern -> finite number that float32 can hold",
    ),
    "target_modules": (_str_or_list, "a string or a list of strings"),
    "modules_to_save": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "layers_to_transform": (
        lambda v: _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)),
        "an integer or a list of integers",
    ),
    "layers_pattern": (_str_or_list, "a string or a list of strings"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or the name of an init method"),
    "layer_replication": (lambda v: isinstance(v, list), "a list of [start, end] pairs"),
    "trainable_token_indices": (
        lambda v: (
            _token_ids(v) or (isinstance(v, dict) and all(isinstance(k, str) and _token_ids(x) for k, x in v.items()))
        ),
        "a list of token ids, or an object of module name -> list of token ids",
    ),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "base_model_name_or_path": (
        lambda v: isinstance(v, str) and "\0" not in v and len(v) <= 4096,
        "a path or a Hub repo id",
    ),
    "task_type": (lambda v: isinstance(v, str), "a string"),
    # read from the raw config by the MoE reading and the MLX route
    "target_parameters": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1 (a dropout probability)"),
    "alpha": (_alpha, "a finite number that float32 can hold (|alpha| <= 3.4e38)"),  # LoHa/LoKr's lora_alpha
    "use_effective_conv2d": (lambda v: isinstance(v, bool), "true or false"),
    "decompose_both": (lambda v: isinstance(v, bool), "true or false"),
    "decompose_factor": (_is_int, "an integer"),
    "peft_version": (
        lambda v: isinstance(v, str) and len(v) <= MAX_VERSION_CHARS,
        f"a version string of at most {MAX_VERSION_CHARS} characters",
    ),
}


def check_schema(
    data: dict[str, Any],
    source: str | None,
    schema: dict[str, tuple[Any, str]] = SCHEMA,
    prefix: str = "",
    fix_in: str = "adapter_config.json",
) -> None:
    """Refuse, by key, a value of the wrong type: ``"use_rslora": "false"`` (which PEFT would take
    as true), ``rank_pattern`` as a list, an alpha that overflows float32, ...  Other dialects pass
    the schema of their own config (``prefix`` names a nested object, e.g. ``lora_parameters.``;
    ``fix_in`` where the value is kept, e.g. a safetensors file's metadata)."""
    for key, (ok, what) in schema.items():
        v = data.get(key)
        if v is not None and not ok(v):
            raise AdapterError(
                f"{prefix}{key} must be {what}, not {_show(v)}", path=source, hint=f"fix this value in {fix_in}"
            )


@dataclass
class AdapterConfig:
    """The parts of a PEFT LoraConfig that change what the tensors mean."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    lora_bias: bool = False
    init_lora_weights: Any = True
    layer_replication: Any = None
    trainable_token_indices: Any = None
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    # -- loading -----------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str | None = None, prefix: str = "", fix_in: str = "adapter_config.json"
    ) -> AdapterConfig:
        """A config from its JSON object (``prefix`` and ``fix_in`` say where its keys live, for messages)."""
        if not isinstance(data, dict):
            raise AdapterError("adapter config is not a JSON object", path=source)
        check_schema(data, source, SCHEMA, prefix, fix_in)
        known = {f for f in cls.__dataclass_fields__ if f not in ("raw", "source")}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        cfg = cls(**kwargs, raw=dict(data), source=source)
        cfg.peft_type = str(data.get("peft_type") or "LORA").upper()
        cfg.rank_pattern = dict(data.get("rank_pattern") or {})
        cfg.alpha_pattern = dict(data.get("alpha_pattern") or {})
        cfg.r = int(cfg.r)
        cfg.lora_alpha = float(cfg.lora_alpha)
        if cfg.peft_type in TUNER_PEFT_TYPES:
            alpha = data.get("alpha")
            cfg.lora_alpha = float(alpha) if alpha is not None else 8.0  # PEFT's default
        cfg._patterns()  # compiled now: a key that is not a valid regex is refused at load
        return cfg

    def _patterns(self) -> tuple[_Patterns, _Patterns]:
        """The compiled pattern keys (also for a config built in code, e.g. by extraction)."""
        got = self.__dict__.get("_compiled")
        keys = (list(self.rank_pattern), list(self.alpha_pattern))
        if got is None or got[0] != keys:
            got = (
                keys,
                _Patterns(keys[0], "rank_pattern", self.source),
                _Patterns(keys[1], "alpha_pattern", self.source),
            )
            self.__dict__["_compiled"] = got
        return got[1], got[2]

    @classmethod
    def for_modules(cls, ranks: dict[str, int], alphas: dict[str, float], **fields: Any) -> AdapterConfig:
        """A config that gives every module its own rank and alpha, as diffusers writes one for a kohya
        LoRA: the most common of each as ``r`` and ``lora_alpha``, the rest in ``rank_pattern`` /
        ``alpha_pattern`` under the module's path — anchored with ``^`` where that path would also match
        another module (PEFT matches a pattern at the end of a path).  Every key is escaped: a path's ``.``
        is a regex wildcard, so ``unet.foo.bar`` unescaped would also match ``unet.fooXbar``.  Checked
        against PEFT's rule; ``source`` (among ``fields``) is the file the names came from, for the error."""
        r, alpha = _most_common(ranks.values(), 8), _most_common(alphas.values(), 8.0)
        names = sorted(ranks)

        def key(m: str) -> str:
            return ("^" if any(o != m and o.endswith("." + m) for o in names) else "") + re.escape(m)

        cfg = cls(
            r=int(r),
            lora_alpha=float(alpha),
            rank_pattern={key(m): v for m, v in sorted(ranks.items()) if v != r},
            alpha_pattern={key(m): float(v) for m, v in sorted(alphas.items()) if v != alpha},
            target_modules=names,
            **fields,
        )
        for m in names:  # the patterns must give back every module's numbers under PEFT's own rule
            if cfg.rank_for(m) != ranks[m] or cfg.alpha_for(m) != alphas[m]:  # (a name that ends in a newline)
                raise AdapterError(
                    f"module {m!r}: its rank and alpha cannot be written as a PEFT pattern that matches it alone",
                    path=fields.get("source"),
                )
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> AdapterConfig:
        path = Path(path)
        if not os.path.lexists(path):
            raise AdapterError(
                "adapter_config.json is missing",
                path=path,
                hint="an adapter folder needs the adapter_config.json PEFT writes",
            ) from None
        data = load_json(path, what="an adapter config", max_bytes=MAX_CONFIG_BYTES, error=AdapterError)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        if self.peft_type in TUNER_PEFT_TYPES:  # LoHaConfig/LoKrConfig: their own keys, none of LoRA's
            return {
                **self.raw,
                "r": self.r,
                "alpha": int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha,
                "rank_pattern": self.rank_pattern,
                "alpha_pattern": self.alpha_pattern,
                "target_modules": self.target_modules,
                "modules_to_save": self.modules_to_save,
                "peft_type": self.peft_type,
                "base_model_name_or_path": self.base_model_name_or_path,
                "task_type": self.task_type,
            }
        out = dict(self.raw)
        out.update(
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern,
            use_dora=self.use_dora,
            fan_in_fan_out=self.fan_in_fan_out,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            bias=self.bias,
            lora_bias=self.lora_bias,
            init_lora_weights=self.init_lora_weights,
            layer_replication=self.layer_replication,
            trainable_token_indices=self.trainable_token_indices,
            peft_type=self.peft_type,
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
        )
        if self.peft_type != "LORA":  # another tuner's config (AdaLoRA, VeRA) is written back as it was read:
            return {**self.raw, **{k: out[k] for k in ("peft_type", "base_model_name_or_path") if k in self.raw}}
        # Normalise so that the numbers round-trip as PEFT writes them.
        if float(out["lora_alpha"]).is_integer():
            out["lora_alpha"] = int(out["lora_alpha"])
        return out

    # -- per-module numbers ---------------------------------------------------------
    def rank_for(self, module: str) -> int:
        key = self._patterns()[0].first(module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = self._patterns()[1].first(module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, module: str, rank: int | None = None) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); ``rank`` from the tensors wins over the config."""
        r = rank if rank is not None else self.rank_for(module)
        if r <= 0:
            raise AdapterError(f"rank {r} for module {module}", tensor=module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def trainable_token_map(self) -> dict[str, list[int]]:
        """``trainable_token_indices`` as {module short name: indices}; a bare list means embed_tokens."""
        tti = self.trainable_token_indices
        if not tti:
            return {}
        if isinstance(tti, list):
            return {"embed_tokens": [int(i) for i in tti]}
        return {str(k): [int(i) for i in v] for k, v in tti.items()}

    # -- what we cannot merge exactly ---------------------------------------------------
    def unsupported_reasons(self) -> list[str]:
        """What stops a route, read from the config alone.  Which tuner's modules a route takes is
        ``routes.TUNER_TAKES``'s, asked per module: a LoHa/LoKr config is no reason here (with LoHa/LoKr modules
        the table refuses them by name; with none, as here with LoRA tensors, the inventory does)."""
        reasons: list[str] = []
        if self.peft_type not in SUPPORTED_PEFT_TYPES + TUNER_PEFT_TYPES:
            reasons.append(
                f"peft_type {self.peft_type} is not LoRA (LoRA, DoRA, AdaLoRA, VeRA, IA³, OFT, BOFT, HRA, LoHa, LoKr, "
                "SHiRA, FourierFT, VB-LoRA, DeLoRA, C3A, RandLoRA, MiSS and RoAd adapters are supported)"
            )
        if self.layer_replication:
            reasons.append("layer_replication duplicates decoder layers; the base's layer layout cannot hold it")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            reasons.append(
                f"init_lora_weights={init!r} changes the base weights at init; the adapter is relative to a "
                "residual base (convert it to plain LoRA with PEFT's path_initial_model_for_weight_conversion first)"
            )
        for key in ("use_qalora", "use_bdlora"):
            if self.raw.get(key):
                reasons.append(f"{key} is not supported")
        for key in ("velora_config", "monteclora_config", "kasa_config", "arrow_config"):
            if self.raw.get(key):
                reasons.append(f"{key.removesuffix('_config')} is a LoRA variant this tool cannot merge")
        return reasons

    def check_supported(self) -> None:
        reasons = self.unsupported_reasons()
        if reasons:
            raise UnsupportedError("; ".join(reasons), path=self.source)

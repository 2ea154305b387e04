"""The internal model of a checkpoint, whatever its dialect: base tensors, LoRA modules per adapter
(with their factors' keys, rank, kind and scaling), tensors that replace base tensors, and the
storage form that adds up to.

A :mod:`dialect <lora_convert.dialects>` turns key names into an :class:`Inventory`; detect, the
routes and report read the inventory and never parse keys again.  Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .arch import layer_index, short_name
from .config import AdapterConfig
from .errors import AdapterError, LoraConvertError

DEFAULT_ADAPTER = "default"
#: Tuners that rotate a weight rather than add to it: no alpha and no scaling; ``rank`` is the block size (OFT, BOFT,
#: LyCORIS Diag-OFT), the reflections r (HRA) or the group size (RoAd).
ROTATION_TUNERS = ("oft", "boft", "hra", "diag-oft", "road")


@dataclass
class LoraModule:
    """One LoRA-wrapped module of one adapter: ΔW = scaling · B·A (embeddings: (B_e·A_e)ᵀ).

    Kind ``experts`` is PEFT's ``target_parameters`` LoRA on a fused expert parameter: ``module`` is the
    parameter's path (``model.layers.0.mlp.experts.gate_up_proj``, the key PEFT's rank_pattern matches),
    ``rank`` is per expert, A is (experts·rank, in) and B (out, experts·rank), packed per ``b_layout``."""

    module: str  # path in the base model, e.g. model.layers.0.self_attn.q_proj
    adapter: str
    kind: str  # "linear", "embedding", "conv" (A (r, in, *kernel), B (out, r, 1, ...); in_features = in·k·k), or "ia3"
    # (PEFT IA³: a_key is the vector that scales W; in_features or out_features is its length, the other 0)
    a_key: str
    b_key: str
    rank: int
    in_features: int  # linear: A's columns; embedding: vocab (A_e's columns)
    out_features: int  # linear: B's rows; embedding: dim (B_e's rows)
    bias_key: str | None = None  # lora_B.bias (lora_bias=True)
    magnitude_key: str | None = None  # DoRA
    scaling: float | None = None  # resolved by the dialect; None when its config is missing
    param: str | None = None  # a 2-D parameter wrapped by target_parameters (a router's "weight")
    experts: int = 1  # kind "experts": E, the experts sharing A and B
    nest: int = 0  # kind "experts": how many ParamWrappers wrap this one (0: outermost, ``experts.lora_A``)
    b_layout: str = "rank_major"  # kind "experts": expert e's B columns are e, e+E, ... or a block (grouped_by_expert)
    b_layout_assumed: bool = False  # no marker in adapter_config.json said which
    # another PEFT tuner's module ("loha", "lokr"): its tensors by PEFT's parameter name (hada_w1_a, lokr_w1,
    # lokr_t2, ...) in ``factors``; a_key/b_key then name two of them (for messages), never LoRA's A and B
    tuner: str = "lora"
    factors: dict[str, str] = field(default_factory=dict)
    factor_params: int = 0  # their elements together: PEFT's trainable parameters of the module
    # the numbers another tuner's ΔW is built with beside its tensors (SHiRA's r, OFT's coft/eps/Cayley-Neumann
    # terms, HRA's apply_GS, VB-LoRA's top-k and bank, ...)
    tuner_args: dict[str, Any] = field(default_factory=dict)
    # another PEFT tuner read as LoRA factors (AdaLoRA, VeRA): its own trainable count, which is not A's and B's
    trained_params: int | None = None

    @property
    def name(self) -> str:
        return short_name(self.module)

    @property
    def alpha(self) -> float:
        """``scaling · rank``: the alpha that gives this module's scaling with plain α/r (what other formats
        store).  Asked only of modules whose dialect resolved a scaling."""
        if self.scaling is None:
            raise AdapterError(f"{self.module}: no scaling known (its adapter_config.json is missing)")
        return float(self.scaling) * self.rank

    @property
    def layer(self) -> int | None:
        return layer_index(self.module)

    @property
    def config_key(self) -> str:
        """The name rank_pattern/alpha_pattern match: PEFT matches ``<module>.<param>`` for target_parameters."""
        return f"{self.module}.{self.param}" if self.param else self.module

    @property
    def stored_rank(self) -> int:
        """Rows of A (columns of B): the rank times the experts that share the factors."""
        return self.rank * self.experts

    @property
    def wrapped(self) -> str:
        """The module whose keys carry this LoRA: an experts parameter's wrapper (``experts.base_layer``
        for an inner one), else the module itself."""
        if self.kind != "experts":
            return self.module
        return self.module.rpartition(".")[0] + ".base_layer" * self.nest


@dataclass
class Inventory:
    form: str  # "adapter", "unmerged" or "plain"
    dialect: str = "peft"
    base: dict[str, str] = field(default_factory=dict)  # base key -> source key (plain/base_layer/original_module)
    lora: dict[str, dict[str, LoraModule]] = field(default_factory=dict)  # adapter -> module -> LoraModule
    replace: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter -> base key -> source key
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter -> module -> delta key
    saved_layers: dict[str, set[str]] = field(default_factory=dict)  # adapter -> base keys saved whole via base_layer
    configs: dict[str, AdapterConfig] = field(default_factory=dict)  # adapter -> its (PEFT-style) config
    warnings: dict[str, list[str]] = field(default_factory=dict)  # adapter -> what its dialect found odd
    # adapter -> what stops converting it (a config that is not its own, ranks the config contradicts):
    # conversions raise the first, detect and report show them
    problems: dict[str, list[LoraConvertError]] = field(default_factory=dict)
    prefixed: bool = False
    spelled: bool = False  # module paths are readings of '_'-joined names (kohya): the base's own names settle them
    unsure: set[str] = field(default_factory=set)  # readings the names alone do not settle (need the base)
    old_layout: bool = False  # base weight at q_proj.weight beside q_proj.lora_A.<name>.weight
    # another PEFT tuner than LoRA, read as LoRA factors through views (dialects/adalora.py): its peft_type and
    # key parameters per adapter, and per module its own tensors (role -> source key), which the routes that
    # write the tuner's own layout (split, attach) copy in place of the views
    tuner: dict[str, dict[str, object]] = field(default_factory=dict)
    native: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)

    @property
    def adapters(self) -> list[str]:
        names = set(self.lora) | set(self.replace) | set(self.tokens)
        return sorted(names)

    def modules(self, adapter: str) -> dict[str, LoraModule]:
        return self.lora.get(adapter, {})

    def config(self, adapter: str) -> AdapterConfig | None:
        return self.configs.get(adapter)

"""Model cards (README.md) for every output folder, with Hub metadata in the YAML header."""

from __future__ import annotations

from typing import Any

from .arch import is_diffusers_config

PIPELINE_BY_ARCH_SUFFIX = {
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForConditionalGeneration": "text-generation",
    "ForMaskedLM": "fill-mask",
}


IMAGE_LORA_FORMS = {
    "kohya": "A kohya (sd-scripts) LoRA file, for ComfyUI, A1111, sd-scripts or diffusers' `load_lora_weights`.",
    "diffusers": "A diffusers LoRA file: `pipe.load_lora_weights(this_folder)`.",
}


def pipeline_tag(model_config: dict[str, Any] | None) -> str | None:
    for arch in (model_config or {}).get("architectures") or []:
        for suffix, tag in PIPELINE_BY_ARCH_SUFFIX.items():
            if str(arch).endswith(suffix):
                return tag
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora-convert")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        return "(source tree)"


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    s = str(v)
    if s == "" or any(c in s for c in ":#{}[],&*?|<>=!%@`'\"\n") or s.strip() != s:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def render_card(
    *,
    form: str,
    base_model: str | None,
    model_config: dict[str, Any] | None,
    command: str | None,
    summary: list[str],
    tables: list[str] | None = None,
    base_named: str | None = None,
) -> str:
    """A README.md: YAML metadata the Hub understands, then what was done and how.

    ``base_model`` is a Hub repo id or None: the Hub rejects (or links nowhere from) anything else, so a
    local base is only named in the text (``base_named``, the base as the user gave it)."""
    meta: dict[str, Any] = {}
    tags = ["lora", "lora-convert"]
    relation: str | None
    if form == "adapter":
        meta["library_name"] = "peft"
        relation = "adapter"
        tags.append("peft")
    elif form == "mlx":
        meta["library_name"] = "mlx"
        relation = "adapter"
        tags.append("mlx")
    elif form in IMAGE_LORA_FORMS:
        meta["library_name"] = "diffusers"
        relation = "adapter"
    else:
        meta["library_name"] = "diffusers" if is_diffusers_config(model_config) else "transformers"
        relation = "merge" if form == "merged" else None
    if base_model:
        meta["base_model"] = base_model
        if relation:
            meta["base_model_relation"] = relation
        if form == "adapter":
            tags.append(f"base_model:adapter:{base_model}")
    tag = pipeline_tag(model_config)
    if tag:
        meta["pipeline_tag"] = tag
    meta["tags"] = tags
    lines = ["---"]
    for k, v in meta.items():
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {_yaml_scalar(x)}" for x in v]
        else:
            lines.append(f"{k}: {_yaml_scalar(v)}")
    lines += ["---", "", f"# {form.capitalize()} checkpoint", ""]
    what = {
        "merged": "LoRA weights folded into the base weights (`W + s·B·A`, computed in fp32 and rounded once).",
        "adapter": "A PEFT LoRA adapter: load it with `PeftModel.from_pretrained(base, this_folder)`.",
        "unmerged": "The full model with LoRA layers inside it, in PEFT's state-dict layout.",
        "base": "The base model, with the LoRA modules stripped and the original key names restored.",
        "mlx": "An mlx-lm LoRA adapter: `mlx_lm.generate --model BASE --adapter-path this_folder`.",
        **IMAGE_LORA_FORMS,
    }.get(form, "")
    lines += [what, ""]
    named = base_model or base_named
    if named:
        lines += [f"Base model: `{named}`" + ("" if base_model else " (a local folder)"), ""]
    lines += [f"- {s}" for s in summary]
    if command:
        lines += ["", f"Made with lora-convert {_version()} by:", "", "```", command, "```"]
    for t in tables or []:
        lines += ["", t]
    return "\n".join(lines) + "\n"

"""Small text formatting shared by the CLI, reports and model cards."""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as the Hub shows sizes); None -> ``"?"``."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def ranges(xs: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (sorted input)."""
    if not xs:
        return ""
    parts, start, prev = [], xs[0], xs[0]
    for x in [*xs[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}-{prev}" if prev != start else str(start))
        if x is not None:
            start = prev = x
    return ",".join(parts)


#: What a user reads for a storage form, where the code's name is not the README's word.  ``plain`` (no LoRA
#: tensors: a base, a merged or a fine-tuned model; ``detect --base`` tells which) is a "full model" in every
#: message, the detect and report text and the model card; ``--json`` keeps ``plain`` (docs/json.md).
FORM_WORDS = {"plain": "full model"}


def form_word(form: str) -> str:
    """``"plain"`` -> ``"full model"``; every other form (adapter, unmerged, merged, base...) as it is."""
    return FORM_WORDS.get(form, form)

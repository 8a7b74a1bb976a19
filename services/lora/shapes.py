"""Whether an adapter was trained on the model the workers serve: each of its LoRA matrices must fit
the weight it adapts, read from both files' safetensors headers (no weights loaded). vLLM copies an
adapter's matrices into buffers sized for the served model, so one trained on a narrower model loads
without a word and changes every reply of its character into noise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import regex

from services.lora.files import BadLoraFile

WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT's saved names: `<module>.lora_A.weight` (a linear layer's) or `<module>.lora_embedding_A` (an
# embedding's), the adapter's own name left out.
_LORA_NAME = regex.compile(
    r"(?P<module>.+)\.(?:lora_(?P<side>[AB])\.weight|lora_embedding_(?P<embedding>[AB]))"
)


_SERVED: dict[Path, dict[str, list[int]]] = {}
INDEX = "model.safetensors.index.json"


def served_weights(model_dir: Path) -> dict[str, list[int]]:
    """The served model's weight shapes by name, from its safetensors files' headers (read once a
    process: the workers' model does not change under them); none, and not kept, while a shard its
    index names is missing (a download still under way: review, the shards that were there were
    taken for the whole model, and an adapter of its other layers refused as another model's)."""
    known = _SERVED.get(model_dir)
    if known is not None:
        return known
    from safetensors import safe_open

    index = model_dir / INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        if not all(isinstance(shard, str) and (model_dir / shard).is_file() for shard in shards):
            return {}
    shapes: dict[str, list[int]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as weights:
            for name in weights.keys():  # noqa: SIM118  (a safe_open handle is no mapping)
                shapes[name] = weights.get_slice(name).get_shape()
    _SERVED[model_dir] = shapes
    return shapes


def _adapter_matrices(path: Path) -> Iterator[tuple[str, list[int]]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as weights:
            for name in weights.keys():  # noqa: SIM118
                yield name, weights.get_slice(name).get_shape()
    except SafetensorError as exc:  # an OSError (the volume away) is the caller's to judge
        raise BadLoraFile(f"{path}: not a safetensors file that can be read ({str(exc)[:200]})") from None


def shape_refusal(adapter_dir: Path, served: dict[str, list[int]]) -> str | None:
    """Why an adapter (its folder) does not fit the model whose weight shapes are `served`; None if
    each matrix fits, or where this cannot be judged: a model whose weights are no safetensors (a
    `.bin`), a module kept as other tensors than one `.weight` (a quantized checkpoint's `qweight`,
    a mixture of experts' `experts.*` blocks), a matrix not of two dimensions. Only safetensors
    adapter weights are read (a `.bin` is pickled: not opened here). BadLoraFile for weights that
    cannot be read."""
    path = adapter_dir / WEIGHTS
    if not served or not path.is_file():
        return None
    for name, shape in _adapter_matrices(path):
        found = _LORA_NAME.fullmatch(name.removeprefix(_PREFIX))
        if found is None:
            continue  # not a LoRA matrix (vLLM refuses extra modules by its own check)
        module = found["module"]
        base = served.get(f"{module}.weight")
        if base is None and module == "lm_head":  # tied to the input embeddings (SmolLM2's)
            base = served.get("model.embed_tokens.weight")
        if base is None:
            if _stands_for(module, served):
                continue  # stored as other tensors (quantized, experts): vLLM's load judges it
            return f"{name}: the served model has no module {module} (trained on another model?)"
        if len(shape) != 2 or len(base) != 2:
            continue
        out_size, in_size = base
        if found["embedding"] is not None:  # an embedding's weight is (vocabulary, width)
            out_size, in_size = in_size, out_size
        side = found["side"] or found["embedding"]
        expected, got, what = (in_size, shape[1], "input") if side == "A" else (out_size, shape[0], "output")
        if got != expected:
            return (
                f"{name}: shape {shape} has {what} size {got} where the served model's "
                f"{module}.weight {base} has {expected} (trained on another model?)"
            )
    return None


def _stands_for(module: str, served: dict[str, list[int]]) -> bool:
    """Whether the served model holds tensors of `module` (or of the module it is a part of, as PEFT
    names a mixture of experts' `experts.base_layer`) other than a `.weight`."""
    path = module.removesuffix(".base_layer")
    return any(name.startswith(path + ".") for name in served)

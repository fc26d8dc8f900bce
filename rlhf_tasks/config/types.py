"""What every config section is built of: the strict scalar types, the section base class
and the cross-field rule (:mod:`rlhf_tasks.config` re-exports them for new sections).

Strict: a bool is no number and a string no number or bool (YAML's ``true``, the form's
``"0.1"``); a float field takes an int (2 -> 2.0), an int field refuses 1.5 and 2.0 alike.
Bounds go in ``Field(ge=..., lt=...)`` next to the type, where pydantic puts them in the JSON
schema: the form's bounds and the error messages' "what is allowed" are read from there.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

Dtype = Literal["fp32", "fp16", "bf16"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
GenerationBackend = Literal["static", "hf"]
ZeroStage = Literal[0, 1, 2, 3]

Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True, min_length=1)]


def _rule(field: str, value: Any, allowed: str) -> PydanticCustomError:
    """A cross-field rule broken, raised from a section's ``model_validator``: reported as
    ``<section>.<field>=<value> is invalid: <allowed>`` (``field`` may be a dotted path)."""
    return PydanticCustomError("rlhf_rule", "{allowed}", {"field": field, "value": value, "allowed": allowed})


class Section(BaseModel):
    """A config section: unknown keys refused, field comments are the form's descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

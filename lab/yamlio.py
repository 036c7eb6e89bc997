"""Reading YAML with libyaml where PyYAML was built with it: the pinned Gateway API CRDs
(~700 KB) parse in 0.08 s instead of 0.8 s on every `lab.up`. Same safe constructors either way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str | bytes) -> Any:
    """``yaml.safe_load``, with libyaml when available."""
    return yaml.load(text, Loader=SafeLoader)


def load_all(text: str | bytes) -> Iterator[Any]:
    """``yaml.safe_load_all``, with libyaml when available."""
    return yaml.load_all(text, Loader=SafeLoader)

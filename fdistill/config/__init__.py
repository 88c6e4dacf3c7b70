"""Typed configuration: dataclass schemas + YAML + dotted overrides (see core.py)."""
from .core import (
    ConfigError,
    build_config,
    diff_configs,
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    save_yaml,
    to_dict,
)

__all__ = ["ConfigError", "build_config", "from_dict", "to_dict", "load_yaml", "parse_overrides",
           "merge", "save_yaml", "diff_configs"]

"""Configs: YAML recipes with ``_base_`` inheritance, command-line overrides, and the typed schema (use:
docs/config.md)."""

from vsekit.config.recipes import apply_overrides, deep_merge, dump_config, load_recipe
from vsekit.config.resolve import resolve_config, validate_config
from vsekit.config.schema import CONFIG_FORMAT, RunConfig
from vsekit.errors import ConfigError

__all__ = ["CONFIG_FORMAT", "ConfigError", "RunConfig", "apply_overrides", "deep_merge", "dump_config",
           "load_recipe", "resolve_config", "validate_config"]

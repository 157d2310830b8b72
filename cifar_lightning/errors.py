"""Errors whose message says what is wrong and how to fix it: the CLI prints them on one line."""


class ConfigError(ValueError):
    """A configuration value cannot work; the message names the field and the fix."""

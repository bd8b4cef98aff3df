"""Errors every floor of jclip may raise; this module imports nothing of jclip, so anyone can import it."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid config value; the message names the field and what is expected.

    Entry points turn it into a one-line message and exit status 2, before anything is built or compiled.
    """

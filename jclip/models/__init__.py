"""jclip.models."""

"""jclip.data."""

"""jclip.losses."""

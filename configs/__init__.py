"""jclip's config files, installed with jclip as the `configs` package.

Each `configs/<method>.py` has `get_config(arg)`; `configs/common.py` holds the shared defaults. Being a
package, a config file anywhere (the repository's, or a user's own) can `from configs import common`.
"""

"""jclip.data: what the config's `data` section becomes.

`configured.ConfiguredData` (sources by spec, mixtures, class names, the op list), `sources/` (raw
examples), `ops/` (named preprocessing ops), `tokenizer` (the text towers' tokenizers by spec), `pipeline`
(Grain: global shuffle, per-host sharding, batching, exact resume) and `robust` (counted skips).
"""

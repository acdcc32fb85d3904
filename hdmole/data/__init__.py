"""Data side of hdmole (docs/data.md); knows no model.

accents (labels), text (normaliser shared with scoring), config (DataConfig), prepare
(checks + lhotse recipes + filters + stats), dataset (log-mel, cache, samplers -> Batch),
synthetic / sentences / accent_rules / speech (the built-in synthetic corpus).
Modules are imported explicitly (heavy dependencies load only where used).
"""

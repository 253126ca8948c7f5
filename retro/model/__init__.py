"""The recurrent model: single-device code (config, layers, RoPE, adapter, loss, FLOP count)."""

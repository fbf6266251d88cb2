"""Compressed-state recipes: MicroAdam, 8-bit / 4-bit states, SPAM, Stable-SPAM (see the compressed-state issue)."""

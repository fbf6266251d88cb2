"""Subspace recipes: GaLore, Fira, FRUGAL, Online Subspace Descent (see the subspace issue)."""

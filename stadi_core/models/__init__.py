"""Model families the engine can split into bands: one adapter module per family."""

from .spec import ModelSpec, build_model, family_adapter

__all__ = ["ModelSpec", "build_model", "family_adapter"]

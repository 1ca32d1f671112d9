"""Models the CLI trains, by registry name (``build_model(name, ...)``); see :mod:`adaptive_dp.models.cnn`."""

from adaptive_dp.models.cnn import DEFAULT_MODEL, MODELS, build_model, register_model, validate_model

__all__ = ["DEFAULT_MODEL", "MODELS", "build_model", "register_model", "validate_model"]

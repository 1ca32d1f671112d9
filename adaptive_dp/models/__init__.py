"""Models the CLI trains, by registry name (``build_model(name, ...)``); see :mod:`adaptive_dp.models.cnn`."""

import adaptive_dp.models.vit  # noqa: F401  (registers "vit-tiny", "vit-small"; imports transformers lazily)
from adaptive_dp.models.cnn import DEFAULT_MODEL, MODELS, build_model, register_model, validate_model

__all__ = ["DEFAULT_MODEL", "MODELS", "build_model", "register_model", "validate_model"]

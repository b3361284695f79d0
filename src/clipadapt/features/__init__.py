"""Cached backbone outputs: FeatureSet, the keyed on-disk cache, and extraction."""

from clipadapt.features.cache import default_cache_dir
from clipadapt.features.extract import extract
from clipadapt.features.featureset import FeatureSet, as_features

__all__ = ["FeatureSet", "as_features", "default_cache_dir", "extract"]

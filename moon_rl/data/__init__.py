"""moon-rl data layer: records, catalogue loading and validation, and the builtin synthetic catalogue."""

from moon_rl.data.catalogue import BUILTIN_SYNTHETIC, Catalogue, find_layout, load_catalogue
from moon_rl.data.records import Pair, Product, Query
from moon_rl.data.sources import DEFAULT_MAX_PIXELS, Problem, load_image
from moon_rl.data.synthetic import SyntheticConfig, SynthReport, synthesize, vocabulary_corpus
from moon_rl.data.validate import ValidationReport, validate_catalogue

__all__ = [
    "BUILTIN_SYNTHETIC",
    "DEFAULT_MAX_PIXELS",
    "Catalogue",
    "Pair",
    "Problem",
    "Product",
    "Query",
    "SyntheticConfig",
    "SynthReport",
    "ValidationReport",
    "find_layout",
    "load_catalogue",
    "load_image",
    "synthesize",
    "validate_catalogue",
    "vocabulary_corpus",
]

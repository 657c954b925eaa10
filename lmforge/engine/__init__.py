from lmforge.engine.cache import KVCache, RecurrentState, make_cache
from lmforge.engine.engine import Engine, generate_naive
from lmforge.engine.sampling import SamplingParams, sample_next

__all__ = ["Engine", "KVCache", "RecurrentState", "SamplingParams", "generate_naive", "make_cache", "sample_next"]

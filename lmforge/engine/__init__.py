from lmforge.engine.cache import KVCache, RecurrentSlots, RecurrentState, make_cache
from lmforge.engine.engine import Engine, Event, Request, Usage, generate_naive
from lmforge.engine.sampling import SamplingParams, sample_next

__all__ = ["Engine", "Event", "KVCache", "RecurrentSlots", "RecurrentState", "Request", "SamplingParams", "Usage",
           "generate_naive", "make_cache", "sample_next"]

"""lmforge: language models from first principles to the frontier, offline, on a CPU."""

__version__ = "0.1.0"

from lmforge.errors import LMForgeError  # noqa: E402


def __getattr__(name):
    # keep `import lmforge` light (no torch) until the API is actually used
    if name in ("LM", "train"):
        from lmforge import api

        return getattr(api, name)
    if name in ("ModelConfig", "TrainConfig"):
        from lmforge import config

        return getattr(config, name)
    raise AttributeError(name)


__all__ = ["LM", "LMForgeError", "ModelConfig", "TrainConfig", "train"]

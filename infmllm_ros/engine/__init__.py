"""The ROS-free core: stream chunks through a transformers model with a memory-capped KV cache.

Nothing in this package imports ROS (a test checks it).
"""

from .cache import CappedCache, CappedLayer
from .models import LoadedModel, load_model, resolve_device, resolve_dtype, smollm2_path
from .policies import (H2O, POLICIES, Full, InfMLLM, Policy, ScoreView, StreamingLLM, TokenBuffer, Window,
                       make_policy)
from .decode import Generation, IncrementalDetokenizer
from .stream import ChatFormat, Stream, StreamConfig
from .types import Answer, AppendResult, Cancelled, Chunk, StreamStats

__all__ = [
    "Answer", "AppendResult",
    "Cancelled", "CappedCache", "CappedLayer", "ChatFormat", "Chunk", "Full", "Generation", "H2O",
    "IncrementalDetokenizer", "InfMLLM",
    "LoadedModel", "POLICIES", "Policy", "ScoreView", "Stream", "StreamConfig", "StreamStats", "StreamingLLM",
    "TokenBuffer", "Window", "load_model", "make_policy", "resolve_device", "resolve_dtype", "smollm2_path",
]

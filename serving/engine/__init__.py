"""The engine: sequences, a pure scheduler, the model runner, and the thread that ties them together."""

from .engine import AsyncEngine, EngineParts, EngineState
from .model_runner import ModelRunner
from .outputs import FinalInfo, RequestOutput, TokenInfo
from .sequence import FinishReason, Sequence, SequenceStatus
from .stream import RequestStream

__all__ = [
    "AsyncEngine",
    "EngineParts",
    "EngineState",
    "FinalInfo",
    "FinishReason",
    "ModelRunner",
    "RequestOutput",
    "RequestStream",
    "Sequence",
    "SequenceStatus",
    "TokenInfo",
]

"""The engine: a step scheduler that advances every live request in one batched step, over
any set of roles behind the batch-first :class:`~eft_router.roles.interface.Role` interface."""

from .engine import Engine, EngineStopped, StepStats
from .request import (
    Generation, GenerationRequest, GenerationStats, ScoreRequest, ScoreResult, StreamChunk, TokenDiagnostics, TokenLogprobs,
)
from .scheduler import QueueFull, SchedulerConfig

__all__ = [
    "Engine", "EngineStopped", "Generation", "GenerationRequest", "GenerationStats", "QueueFull", "SchedulerConfig",
    "ScoreRequest", "ScoreResult", "StepStats", "StreamChunk", "TokenDiagnostics", "TokenLogprobs",
]

"""Task handlers by task name: the one registry the data plane and transports consult.

Adding a task: write a TaskHandler subclass in its own module (see base.py), add its
imgserve.v1 request/response messages and RPC to the proto, and register it below.
Nothing else in the gateway changes: transports route imgserve.v1 methods, HTTP paths
and v2 requests through ``handler_for``.
"""
from __future__ import annotations

from serving.repository import ModelSpec, RepositoryError
from serving.tasks.base import TaskHandler
from serving.tasks.classification import ClassificationHandler
from serving.tasks.detection import DetectionHandler
from serving.tasks.segmentation import SegmentationHandler

HANDLERS: dict[str, TaskHandler] = {h.task: h for h in (ClassificationHandler(), DetectionHandler(),
                                                        SegmentationHandler())}
BY_V1_METHOD: dict[str, TaskHandler] = {h.v1_method: h for h in HANDLERS.values()}


def handler_for(task: str) -> TaskHandler:
    """The handler of a task; RepositoryError for a task this gateway cannot serve."""
    handler = HANDLERS.get(task)
    if handler is None:
        raise RepositoryError(f"unknown task {task!r}; this gateway serves {', '.join(HANDLERS)}")
    return handler


def check_servable(spec: ModelSpec) -> TaskHandler:
    """The spec's handler after checking that the model's outputs fit its task (RepositoryError if not)."""
    handler = handler_for(spec.task)
    handler.check_spec(spec)
    return handler


__all__ = ["BY_V1_METHOD", "HANDLERS", "TaskHandler", "check_servable", "handler_for"]

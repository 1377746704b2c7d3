"""Training recipes for the dense tasks, siblings of the classifier's export/train.py (torchvision
``references/detection`` and ``references/segmentation`` style): ``common`` holds the options and
the loop they share, ``detection`` and ``segmentation`` what differs (data, targets, loss, scoring)."""
from __future__ import annotations

import importlib
from typing import Any

TASKS = ("detection", "segmentation")


def load_task(name: str) -> Any:
    """The recipe object (a recipes.common.DenseTask) of a task, importing its module only now."""
    if name not in TASKS:
        raise KeyError(f"no dense recipe for task {name!r}; known: {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{name}").TASK

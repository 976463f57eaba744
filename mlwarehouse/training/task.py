"""A fit as a task: what a worker calls for a task made by :meth:`mlwarehouse.training.registry.Training.submit`.

The task's hyper-parameters carry the fit spec as names (JSON); the worker's child process rebuilds the model
(from the registry, or an importable class: a worker runs the code its tasks name), and fits with the task's id
as the fit's key, so an attempt that takes over from a killed one resumes from the last checkpoint.
"""

from __future__ import annotations

import json
from typing import Any

from mlwarehouse.context import current_task
from mlwarehouse.errors import QueryError

__all__ = ["run_fit"]


def run_fit(model: dict, data: str, inputs: list, target: str | None = None, config: dict | None = None,
            options: dict | None = None) -> dict[str, Any]:
    """Run (or resume) the fit of the current task; returns the fit's and the model's ids and the epochs done."""
    from mlwarehouse.warehouse import connect
    task = current_task()
    if task is None:
        raise QueryError("run_fit runs inside a task: submit the fit with wh.training.submit(...)")
    wh = connect(project=task.project)
    try:
        project = wh.project(task.project)
        target_model = model.get("id") or model.get("class")
        options = dict(options or {})
        if isinstance(options.get("filter"), str):
            options["filter"] = json.loads(options["filter"])
        fit = project.training.fit(target_model, data, inputs=inputs, target=target, config=config,
                                   verbose=True, **options)
        return {"fit": fit.id, "model": fit.doc.get("model"), "epochs": fit.doc.get("epochs_done")}
    finally:
        wh.close()

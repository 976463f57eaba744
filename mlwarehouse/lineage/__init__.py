"""Lineage: what every dataset, run, model, task, listener and vector index came from and what was made from it.

    wh.lineage.upstream(model)       # the run, the datasets it read, the task that ran it...
    wh.lineage.downstream(dataset)   # the runs that read it, the models they produced...
    wh.lineage.impact(dataset)       # what deleting it would orphan

See :mod:`mlwarehouse.lineage.graph` for the edges recorded and what a delete does.
"""

from mlwarehouse.lineage.graph import NOT_BLOCKING, Edge, Lineage, Node
from mlwarehouse.lineage.nodes import KINDS, Ref

__all__ = ["Lineage", "Node", "Edge", "Ref", "KINDS", "NOT_BLOCKING"]

"""Tasks: the leased queue (:mod:`.queue`), sweeps (:mod:`.sweeps`), the worker that pulls and runs them
(:mod:`.worker`) and what runs inside each task's own process (:mod:`.runtime`)."""

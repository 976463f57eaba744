"""Tasks: the leased queue (:mod:`.queue`), sweeps (:mod:`.sweeps`), what a task stores about its script
(:mod:`.scripts`), the worker that pulls and runs tasks (:mod:`.worker`) and the task process it starts for each
attempt (:mod:`.runtime`)."""

"""Runs and their logs: the run registry (:mod:`.registry`), the buffered log writer (:mod:`.logwriter`) and the
layout of per-metric summaries kept on each run (:mod:`.summary`)."""

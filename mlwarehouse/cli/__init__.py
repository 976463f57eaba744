"""The ``mlw`` command line: the commands (:mod:`.main`), item datasets (:mod:`.items`) and what they share
(:mod:`.common`: options, opening the warehouse, one-line errors)."""

from mlwarehouse.cli.main import main

__all__ = ["main"]

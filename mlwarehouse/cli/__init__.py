"""The ``mlw`` command line (:mod:`.main`; item datasets in :mod:`.items`)."""

from mlwarehouse.cli.main import main

__all__ = ["main"]

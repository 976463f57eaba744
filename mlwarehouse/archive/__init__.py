"""Portable archives of a project: ``mlw export`` / ``mlw import`` (:mod:`.tarball`)."""

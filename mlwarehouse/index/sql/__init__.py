"""Filters and sorts compiled to SQL: the compiler and the SQLite dialect (:mod:`.compiler`), PostgreSQL's
dialect (:mod:`.postgres_dialect`)."""

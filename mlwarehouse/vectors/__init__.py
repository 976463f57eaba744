"""Vector indexes over collections: definitions, the embedded engines and their mirrors, pgvector, search."""

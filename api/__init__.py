"""HTTP ingest for game backends in any language: a thin FastAPI layer over services/."""

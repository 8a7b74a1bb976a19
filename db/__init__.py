"""The schema and every query: SQLAlchemy 2 models on PostgreSQL + pgvector."""

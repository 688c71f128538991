"""Orchestration: the `bit` command, parameter overrides, and the Prefect flow over DVC stages."""

"""Pipeline stages: one module per dvc.yaml stage, each a worker function plus a small main."""

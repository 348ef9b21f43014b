"""Prefect flows: the only package that imports Prefect. Each stage of pipeline/ is one task."""

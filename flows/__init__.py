"""Prefect flows: they only compose the steps in `tasks/`."""

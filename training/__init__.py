"""Datasets, fitting and evaluation of adapters on cached base vectors."""

"""negprep: distributed hard-negative mining and training-data preparation for embedding models."""

__version__ = "0.1.0"

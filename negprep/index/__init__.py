"""Nearest-neighbour search over corpus embeddings: faiss index shards and the GPU kNN."""

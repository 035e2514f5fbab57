"""The stages of a mining job, one file each, in the order they run:
read -> embed -> search -> mine (which also writes the output)."""

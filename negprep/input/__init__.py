"""What a job reads: input files, their pieces, row checks, corpus and query shards."""

"""The mining rules as pure functions: which candidates may be negatives, and how rows form training batches."""

"""Data sources: iterable sharding (and, later, chunked HDF5)."""

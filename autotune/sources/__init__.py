"""Data sources: samplers, splits, dataset wrappers, iterable sharding, chunked HDF5."""

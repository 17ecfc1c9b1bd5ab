"""Building loaders: the one builder, the factory, worker start-up, crash naming, safety."""

"""Building loaders: the one pipeline (resolve -> sampler -> checks -> build), the factory, groups."""

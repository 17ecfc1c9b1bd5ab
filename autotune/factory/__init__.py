"""Building loaders: the one pipeline (resolve -> sampler -> checks -> build), factory, groups."""

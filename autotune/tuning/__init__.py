"""The offline autotuner: runs the search over real trials and keeps the result."""

"""Worker processes and the one DataLoader builder: start-up, crash naming, safety checks."""

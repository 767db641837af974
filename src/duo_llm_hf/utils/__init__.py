"""Small helpers shared by every stage: user-facing errors, argument parsing, run files, loading Duo folders,
tables, FLOP counts and process info."""

"""End-to-end time-to-first-token benchmark of kvbm on a random-weight decoder (see README.md)."""

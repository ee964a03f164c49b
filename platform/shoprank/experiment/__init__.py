"""A/B experiments: the statistics of the report, as plain functions."""

"""mbvisor's benchmarks: ``mbvisor bench <name>`` or ``python bench/<name>.py``."""

"""``eclm cloud serve``: the long-running service, its config file, its state database,
metrics and logs."""

"""What devices learned, combined: adapter updates checked and aggregated per domain
(strategies, the service's ledger), and integration into a new head (one process or
``torch.distributed``)."""

"""Programs from the model: ExecuTorch and LiteRT export of each module, the service's
export worker pool, and planning a device's sub-model."""

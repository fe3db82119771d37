"""Fleet control over MQTT: desired states out and chunks on request (the coordinator),
staged rollouts, the signing key, per-device rate limits and deploying from outside."""

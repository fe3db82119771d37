"""A baseline's payloads through a real Mosquitto: what goes in comes out, byte for byte,
in pieces under the packet limit."""

import numpy as np

from eclm_lab.link import BrokerLink


def test_large_payloads_arrive_whole_in_both_directions(address):
    link = BrokerLink(address, "link-test")
    rng = np.random.default_rng(0)
    try:
        for n, direction in enumerate(("up", "down") * 3):
            # a 1.2 MB sub-model's weights: 13 pieces; then a small and an empty payload
            for size in (1_250_000 + n, 1_000, 0):
                payload = rng.bytes(size)
                assert link(f"dev-{n}", "weights", direction, payload) == payload
    finally:
        link.close()
    assert link.bytes["up", "weights"] > 3 * 1_251_000
    assert link.bytes["down", "weights"] > 3 * 1_251_000

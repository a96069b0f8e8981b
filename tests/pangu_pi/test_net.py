"""pangu_pi.net.free_port: a port a server can bind, outside the range outgoing connections draw from."""

from __future__ import annotations

import socket

from pangu_pi import net


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    low, _ = net._ephemeral_range()
    ports = {net.free_port() for _ in range(20)}
    assert len(ports) > 1  # drawn at random, not a fixed port every caller would fight over
    for port in ports:
        assert port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_that_is_taken(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        draws = iter([taken, taken])

        class Rng:
            def randrange(self, a, b):
                return next(draws, a + 7)

        monkeypatch.setattr(net.random, "SystemRandom", lambda: Rng())
        monkeypatch.setattr(net, "_ephemeral_range", lambda: (max(taken + 1, 20009), 60999))
        port = net.free_port()
        assert port != taken

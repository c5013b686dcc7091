"""The session guard: a test that opens a socket to anything but loopback fails."""

from __future__ import annotations

import socket

import pytest


@pytest.mark.parametrize("address", [("203.0.113.7", 443), ("api.wandb.ai", 443), ("2001:db8::1", 80, 0, 0)])
def test_non_loopback_connect_is_refused_before_any_packet(address: tuple) -> None:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(AssertionError, match="only loopback"):
        sock.connect(address)
    with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(AssertionError, match="only loopback"):
        sock.connect_ex(address)


def test_loopback_is_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass

"""The listening site of an aiohttp server (the sidecar, ``/metrics``) on ``HOST:PORT``.

asyncio binds an IPv6 address with ``IPV6_V6ONLY`` set, so ``[::]:8080`` would
take IPv6 clients only, while gRPC's ``[::]`` is dual-stack. A wildcard IPv6
address is therefore bound here, on one socket that accepts IPv4 too (as
IPv4-mapped addresses); any other host goes to aiohttp's ``TCPSite``.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp import web

from service.startup import split_addr


def _is_ipv6_wildcard(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 6 and address.is_unspecified


def _dual_stack_socket(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock


def dual_stack_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket | None:
    """For a wildcard IPv6 ``host``: a bound socket that takes IPv4 clients too (may raise ``OSError``); else None."""
    return _dual_stack_socket(port, reuse_port) if _is_ipv6_wildcard(host) else None


def site(runner: web.BaseRunner, addr: str, *, reuse_port: bool = False) -> web.BaseSite:
    """A site of ``runner`` on ``addr`` (not started); binding a wildcard IPv6 address may raise ``OSError``."""
    host, port = split_addr(addr)
    sock = dual_stack_socket(host, port, reuse_port=reuse_port)
    if sock is not None:
        return web.SockSite(runner, sock)
    return web.TCPSite(runner, host, port, reuse_port=reuse_port or None)

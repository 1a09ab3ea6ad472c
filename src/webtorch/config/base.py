"""What every section shares: strict models (an unknown key is an error, so a typo never
silently does nothing), addresses and networks checked as values."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def check_networks(networks: list[str]) -> list[str]:
    """``networks`` if each is an address or CIDR block; else the error names the bad one."""
    for cidr in networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP address or CIDR block") from None
    return networks

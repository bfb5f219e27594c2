"""The operator's tunnel: the ``flwr`` CLI's way to the gateway's operators' listener.

The gateway (:mod:`server.gateway`) forwards the Control API only to clients presenting an
operator certificate, and in flwr 1.41 the ``flwr`` CLI cannot present one: its HTTP client
(``flwr.supercore.protobuf.client.ProtobufClient``) is built with a server CA only, and no
setting or environment variable adds a client certificate. So the operator runs this tunnel on
their workstation: it listens on loopback, and forwards each connection, byte for byte, inside
a TLS connection to the gateway that presents the operator's certificate and verifies the
gateway's certificate against the consortium CA. ``flwr`` then uses a connection with
``address = "127.0.0.1:<port>"`` and ``insecure = true`` (plain HTTP on the loopback hop only).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .errors import GatewayError
from .gateway import Listener

__all__ = ["TunnelSpec", "client_context", "run_tunnel", "serve_tunnel"]

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class TunnelSpec:
    """Where the tunnel listens, where it goes, and with which credential."""

    gateway_host: str
    gateway_port: int
    ca_certificate: Path
    certificate: Path
    key: Path
    listen: Listener = Listener("127.0.0.1", 9093)
    server_name: str | None = None  # the name checked in the gateway's certificate

    def __post_init__(self) -> None:
        if not self.listen.ip.is_loopback:
            raise GatewayError(
                f"the tunnel must listen on loopback (got {self.listen}): whoever reaches it acts "
                "with your operator certificate"
            )


def client_context(spec: TunnelSpec) -> ssl.SSLContext:
    """TLS client context: verifies the gateway with the CA, presents the operator certificate."""
    for what, path in (("CA certificate", spec.ca_certificate), ("operator certificate", spec.certificate),
                       ("operator key", spec.key)):
        if not Path(path).is_file():
            raise GatewayError(f"{what} {path} does not exist")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(spec.ca_certificate))
        context.load_cert_chain(str(spec.certificate), str(spec.key))
    except (ssl.SSLError, ValueError) as exc:
        raise GatewayError(f"cannot load the operator certificate and key: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _subject(path: Path) -> str:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()).subject.rfc4514_string()
    except ValueError as exc:
        raise GatewayError(f"{path} is not a PEM certificate: {exc}") from exc


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _check_gateway(spec: TunnelSpec, context: ssl.SSLContext) -> None:
    """One handshake up front, so that a wrong address or CA fails now, with its reason."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            spec.gateway_host, spec.gateway_port, ssl=context,
            server_hostname=spec.server_name or spec.gateway_host), timeout=15)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
        raise GatewayError(
            f"cannot open TLS to the gateway's operators' listener {spec.gateway_host}:{spec.gateway_port}: "
            f"{exc or type(exc).__name__}"
        ) from exc
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def serve_tunnel(spec: TunnelSpec, ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled; ``ready(message)`` once listening."""
    context = client_context(spec)
    await _check_gateway(spec, context)

    async def forward(local_reader: asyncio.StreamReader, local_writer: asyncio.StreamWriter) -> None:
        try:
            remote_reader, remote_writer = await asyncio.open_connection(
                spec.gateway_host, spec.gateway_port, ssl=context,
                server_hostname=spec.server_name or spec.gateway_host)
        except (OSError, ssl.SSLError):
            local_writer.close()
            return
        await asyncio.gather(_pipe(local_reader, remote_writer), _pipe(remote_reader, local_writer))

    try:
        server = await asyncio.start_server(forward, spec.listen.host, spec.listen.port)
    except OSError as exc:
        raise GatewayError(f"cannot listen on {spec.listen}: {exc}") from exc
    async with server:
        port = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(f"fedseg tunnel: listening on {Listener(spec.listen.host, port)} -> "
                  f"{spec.gateway_host}:{spec.gateway_port} as {_subject(spec.certificate)}")
        await server.serve_forever()


def run_tunnel(spec: TunnelSpec, ready: Callable[[str], None] | None = None) -> None:
    """:func:`serve_tunnel` until interrupted (Ctrl-C, SIGTERM)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_tunnel(spec, ready))

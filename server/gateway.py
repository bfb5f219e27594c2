"""The coordinator's gateway: an nginx configuration that keeps the SuperLink's Control and
Runtime APIs off the address the hospitals reach.

In flwr 1.41 one SuperLink port serves every API over HTTP(S): the Fleet API (``/v1/fleet/*``,
what SuperNodes call), the Control API (``/v1/control/*``: start, stop, list and log runs,
register nodes; no account authentication in Flower's open-source distribution) and the Runtime
API (``/v1/runtime/*``, the ServerApp's). So the SuperLink binds to loopback, and nginx, in
the same network namespace, listens twice:

- the **sites' listener** (the address hospitals dial, TLS with the SuperLink's certificate)
  forwards exactly ``POST /v1/fleet/<method>`` and ``GET /health``; everything else gets a 404
  that names the rule, and never reaches the SuperLink;
- the **operators' listener** (a management address) forwards ``POST /v1/control/<method>``
  only to clients presenting a TLS certificate of the operator CA (``fedseg pki
  operator-cert``), optionally only the certificates listed (revocation by regenerating).

The Runtime API is forwarded by neither: the ServerApp process (``flower-superexec``) dials the
SuperLink's loopback address from the same network namespace. Forwarded paths are rebuilt from
the matched method name, so no encoded or dotted variant of a path reaches the SuperLink.

:func:`render_nginx_conf` is pure (a :class:`GatewaySpec` in, the file's text out);
``fedseg coordinator gateway`` writes it; the deployment files carry its output verbatim.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import GatewayError

__all__ = [
    "CONTROL_PATH",
    "FLEET_PATH",
    "GatewaySpec",
    "Listener",
    "parse_listener",
    "render_nginx_conf",
]

# The paths each listener forwards (nginx matches them against the normalised URI).
FLEET_PATH = r"^/v1/fleet/([a-z][a-z-]*)$"
CONTROL_PATH = r"^/v1/control/([a-z][a-z-]*)$"
_HEALTH = "/health"
_SAFE_VALUE = re.compile(r"^[^\s\"';{}$\\#]+$")  # nothing that could end or extend an nginx directive
_SIZE = re.compile(r"^\d+[kKmMgG]?$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Listener:
    """An IP address and port (``host:port``, ``[v6]:port``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.host)


def parse_listener(value: str, what: str) -> Listener:
    """``HOST:PORT`` with HOST an IP address; a :class:`GatewayError` naming WHAT otherwise."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([0-9.]+):(\d+)", value.strip())
    if not match:
        raise GatewayError(f"{what} {value!r} is not IP:PORT (e.g. 0.0.0.0:8000, [::1]:9443)")
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise GatewayError(f"{what} {value!r}: {host!r} is not an IP address") from None
    if not 1 <= int(port) <= 65535:
        raise GatewayError(f"{what} {value!r}: port must be between 1 and 65535")
    return Listener(host, int(port))


def _value(what: str, value: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise GatewayError(f"{what} {value!r} holds a space, quote, ';', '{{', '}}', '$', '#' or '\\'")
    return value


@dataclass(frozen=True)
class GatewaySpec:
    """Everything the gateway's nginx configuration depends on.

    Parameters
    ----------
    certificate, certificate_key
        The TLS certificate both listeners present (the SuperLink's: it names the host names
        the hospitals dial) and its key.
    ca_certificate
        The consortium CA: nginx verifies the SuperLink's certificate with it.
    operator_ca
        The CA whose client certificates the operators' listener accepts (``fedseg pki
        init-ca`` for operators, never the one any site credential comes from).
    site_listen, operator_listen
        The sites' and the operators' addresses (distinct ports).
    superlink
        Where the SuperLink listens: a loopback address (``flower-superlink --host --port``).
    superlink_name
        A DNS name in the SuperLink certificate, checked on the loopback hop.
    operator_fingerprints
        When not empty, only these client certificates (SHA-1, nginx's
        ``$ssl_client_fingerprint``) may use the operators' listener.
    runtime_dir
        A writable directory for nginx's pid file and request buffers.
    access_log
        Where each request is logged (with the operator certificate's subject).
    max_body
        The largest request body (nginx size; flwr's own message limit is 512 MiB).
    """

    certificate: str
    certificate_key: str
    ca_certificate: str
    operator_ca: str
    site_listen: Listener = field(default_factory=lambda: Listener("0.0.0.0", 8000))
    operator_listen: Listener = field(default_factory=lambda: Listener("127.0.0.1", 9443))
    superlink: Listener = field(default_factory=lambda: Listener("127.0.0.1", 9091))
    superlink_name: str = "localhost"
    operator_fingerprints: tuple[str, ...] = ()
    runtime_dir: str = "/tmp"
    access_log: str = "/dev/stdout"
    max_body: str = "512m"

    def __post_init__(self) -> None:
        for what in ("certificate", "certificate_key", "ca_certificate", "operator_ca", "runtime_dir",
                     "access_log", "superlink_name"):
            _value(what, getattr(self, what))
        if not self.superlink.ip.is_loopback:
            raise GatewayError(
                f"the SuperLink must listen on loopback (got {self.superlink}): on any other address "
                "its Control and Runtime APIs are reachable without the gateway"
            )
        ports = {self.site_listen.port, self.operator_listen.port, self.superlink.port}
        if len(ports) != 3:
            raise GatewayError(
                f"the sites' listener ({self.site_listen}), the operators' listener "
                f"({self.operator_listen}) and the SuperLink ({self.superlink}) need three distinct ports"
            )
        if not _SIZE.match(self.max_body):
            raise GatewayError(f"max body {self.max_body!r} is not an nginx size (e.g. 512m)")
        for fingerprint in self.operator_fingerprints:
            if not _FINGERPRINT.match(fingerprint):
                raise GatewayError(f"operator fingerprint {fingerprint!r} is not 40 lower-case hex digits")

    def command(self) -> str:
        """The ``fedseg coordinator gateway`` command that renders this spec."""
        args = [
            "fedseg", "coordinator", "gateway",
            "--site-listen", str(self.site_listen), "--operator-listen", str(self.operator_listen),
            "--superlink", str(self.superlink), "--superlink-name", self.superlink_name,
            "--cert", self.certificate, "--key", self.certificate_key, "--ca", self.ca_certificate,
            "--operator-ca", self.operator_ca, "--runtime-dir", self.runtime_dir,
            "--access-log", self.access_log, "--max-body", self.max_body,
        ]
        for fingerprint in self.operator_fingerprints:
            args += ["--allow-fingerprint", fingerprint]
        return shlex.join(args)


def _refusal(listener: str, rule: str) -> str:
    return f'return 404 "fedseg gateway: {listener} serves {rule} only\\n";'


def _proxy(path_prefix: str) -> list[str]:
    return [
        "limit_except POST { deny all; }",
        f"proxy_pass https://superlink{path_prefix}$1;",
    ]


def _health() -> list[str]:
    return [f"location = {_HEALTH} {{",
            "    limit_except GET { deny all; }",
            f"    proxy_pass https://superlink{_HEALTH};",
            "}"]


def _block(header: str, body: Sequence[str], indent: str) -> list[str]:
    inner = indent + "    "
    return [f"{indent}{header} {{", *(inner + line if line else "" for line in body), f"{indent}}}"]


def render_nginx_conf(spec: GatewaySpec) -> str:
    """The gateway's complete ``nginx.conf`` for SPEC (run it with ``nginx -c FILE -e stderr``;
    it stays in the foreground)."""
    run = spec.runtime_dir.rstrip("/") or "/"
    temp = {kind: f"{run}/fedseg-gateway-{kind}" for kind in ("client-body", "proxy", "fastcgi", "uwsgi", "scgi")}
    allow_list = bool(spec.operator_fingerprints)

    site = [
        f"listen {spec.site_listen} ssl;",
        "# hospitals' SuperNodes: the Fleet API and the health probe, nothing else",
        *_block(f'location ~ "{FLEET_PATH}"', _proxy("/v1/fleet/"), ""),
        *_health(),
        *_block("location /", [_refusal("the sites' address", "the Fleet API")], ""),
    ]
    operator = [
        f"listen {spec.operator_listen} ssl;",
        "# operators: the Control API, with a client certificate of the operator CA",
        f'ssl_client_certificate "{spec.operator_ca}";',
        "ssl_verify_client on;",
        "ssl_verify_depth 1;",
        "error_page 495 496 = @no_operator_certificate;",
        *([] if not allow_list else
          ["if ($fedseg_operator_allowed = 0) {",
           '    return 403 "fedseg gateway: this operator certificate is not (or no longer) allowed\\n";',
           "}"]),
        *_block(f'location ~ "{CONTROL_PATH}"', _proxy("/v1/control/"), ""),
        *_health(),
        *_block("location @no_operator_certificate", [
            'return 403 "fedseg gateway: the operators\' address requires a client certificate '
            'of the operator CA\\n";'], ""),
        *_block("location /", [_refusal("the operators' address", "the Control API")], ""),
    ]
    http = [
        "server_tokens off;",
        "default_type text/plain;",
        f'client_body_temp_path "{temp["client-body"]}";',
        f'proxy_temp_path "{temp["proxy"]}";',
        f'fastcgi_temp_path "{temp["fastcgi"]}";',
        f'uwsgi_temp_path "{temp["uwsgi"]}";',
        f'scgi_temp_path "{temp["scgi"]}";',
        "log_format fedseg_gateway '$time_iso8601 $server_port $remote_addr \"$ssl_client_s_dn\" "
        "\"$request\" $status $body_bytes_sent';",
        f'access_log "{spec.access_log}" fedseg_gateway;',
        f"client_max_body_size {spec.max_body};",
        "",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        f'ssl_certificate "{spec.certificate}";',
        f'ssl_certificate_key "{spec.certificate_key}";',
        "",
        "# the SuperLink, on loopback: its certificate is checked on this hop too",
        *_block("upstream superlink", [f"server {spec.superlink};", "keepalive 8;"], ""),
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Forwarded-For $remote_addr;",
        f'proxy_ssl_trusted_certificate "{spec.ca_certificate}";',
        "proxy_ssl_verify on;",
        "proxy_ssl_verify_depth 2;",
        f"proxy_ssl_name {spec.superlink_name};",
        "proxy_ssl_server_name on;",
        "proxy_ssl_session_reuse on;",
        "proxy_buffering off;  # `flwr log` streams",
        "proxy_request_buffering off;  # bodies stream to the SuperLink, never to disk",
        "proxy_read_timeout 3600s;",
        "proxy_send_timeout 3600s;",
        "",
        *([] if not allow_list else _block("map $ssl_client_fingerprint $fedseg_operator_allowed", [
            "default 0;", *(f"{fp} 1;" for fp in spec.operator_fingerprints)], "")),
        *_block("server", site, ""),
        "",
        *_block("server", operator, ""),
    ]
    lines = [
        "# The fedseg coordinator's gateway (nginx). Generated by server/gateway.py; do not edit,",
        "# regenerate with:",
        f"#   {spec.command()}",
        f"# sites' address      {spec.site_listen}: POST /v1/fleet/<method>, GET /health",
        f"# operators' address  {spec.operator_listen}: POST /v1/control/<method>, operator CA certificate",
        f"# SuperLink           {spec.superlink} (loopback): Runtime API for the ServerApp process only",
        "daemon off;  # in the foreground: a container's command, systemd Type=simple",
        "worker_processes 1;",
        f'pid "{run}/fedseg-gateway.pid";',
        "error_log stderr notice;",
        "events { worker_connections 1024; }",
        "",
        *_block("http", http, ""),
    ]
    return "\n".join(lines) + "\n"

"""The forwarder's settings: every option a TOML key and a ``JOBTUNNEL_*`` variable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared import config as c
from shared.auth import CONNECT_SCOPE

LOOPBACK = ("127.0.0.0/8", "::1/128")


def optional_cidr_list(raw: object) -> tuple[str, ...] | None:
    return c.cidr_list(raw)


@dataclass(frozen=True, slots=True)
class ForwarderSettings:
    listen: c.HostPort = c.option(c.listen_address, c.HostPort("0.0.0.0", 31022))
    http: c.HostPort = c.option(c.listen_address, c.HostPort("0.0.0.0", 8080))
    #: ``/tunnels`` (standalone mode only: every user, job and listener), loopback by default.
    admin_http: c.HostPort = c.option(c.listen_address, c.HostPort("127.0.0.1", 8081))
    host_key: Path = c.option(c.path, Path("/var/lib/jobtunnel/ssh_host_ed25519_key"))
    auth: str = c.option(c.choice("token-file", "hub"), "token-file")
    token_file: Path | None = c.option(c.optional_path, None)
    hub_api_url: str | None = c.option(c.optional_string, None)
    hub_ca_bundle: Path | None = c.option(c.optional_path, None)
    hub_verify_tls: bool = c.option(c.boolean, True)
    hub_timeout: float = c.option(c.positive_float, 5.0)
    #: A job's token must hold these (the hub's custom tunnel-only scope by default)...
    hub_required_scopes: tuple[str, ...] = c.option(c.string_list, (CONNECT_SCOPE,))
    #: ...and nothing beyond them and the identity scopes, unless this is true.
    hub_allow_broad_tokens: bool = c.option(c.boolean, False)
    auth_cache_ttl: float = c.option(c.positive_float, 60.0)
    auth_negative_cache_ttl: float = c.option(c.positive_float, 10.0)
    auth_max_failures: int = c.option(c.positive_int, 10)
    auth_failure_window: float = c.option(c.positive_float, 60.0)
    revalidate_interval: float = c.option(c.positive_float, 180.0)
    port_range: c.PortRange = c.option(c.port_range, c.PortRange(40000, 40999))
    service_host: str = c.option(c.string, "127.0.0.1")
    advertise_host: str | None = c.option(c.optional_string, None)
    allowed_services: tuple[str, ...] = c.option(c.name_list, ("scheduler", "dashboard"))
    #: Peers that may connect to any tunnelled service (CIDRs). Kubernetes mode adds, per
    #: Tunnel, the owner's pods and the Dask operator's that the reconciler writes in its
    #: status; until it has, only these are let in. Unset: loopback standalone, nothing with
    #: publish=kubernetes (a sidecar proxy there hands every peer over from 127.0.0.x).
    allowed_sources: tuple[str, ...] | None = c.option(optional_cidr_list, None)
    #: Distinct refused peers (and refused claimants) remembered and reported per session;
    #: beyond that only counted. At most 64 (the Tunnel CRD's bound).
    max_refused_sources: int = c.option(c.positive_int, 16)
    max_sessions_per_user: int = c.option(c.positive_int, 20)
    max_unauthenticated: int = c.option(c.positive_int, 100)
    # Admission (daemons/forwarder/admission.py): per-source and per-connection allowances.
    max_unauthenticated_per_source: int = c.option(c.positive_int, 32)
    max_auth_tries: int = c.option(c.positive_int, 6)
    max_channels_per_connection: int = c.option(c.positive_int, 4)
    max_forward_requests_per_connection: int = c.option(c.positive_int, 16)
    max_refusals_per_connection: int = c.option(c.positive_int, 32)
    control_frame_rate: float = c.option(c.positive_float, 20.0)
    control_frame_burst: int = c.option(c.positive_int, 100)
    # Repeated refusals: one line per source and kind per interval, then a count.
    log_summary_interval: float = c.option(c.positive_float, 10.0)
    login_timeout: float = c.option(c.positive_float, 30.0)
    keepalive_interval: float = c.option(c.positive_float, 15.0)
    keepalive_count_max: int = c.option(c.positive_int, 4)
    heartbeat_interval: float = c.option(c.positive_float, 10.0)
    #: How long a published session gets to answer the liveness challenge a claimant of its
    #: identity triggers: it keeps the identity if it answers, and is replaced if not.
    takeover_challenge_timeout: float = c.option(c.positive_float, 5.0)
    drain_timeout: float = c.option(c.positive_float, 10.0)
    publish: str = c.option(c.choice("memory", "kubernetes"), "memory")
    # publish=kubernetes: where Tunnel objects go and which pod this is (downward API).
    namespace: str | None = c.option(c.optional_string, None)
    pod_name: str | None = c.option(c.optional_string, None)
    pod_ip: str | None = c.option(c.optional_string, None)
    # Least time between two status.lastHeartbeat patches of one Tunnel.
    tunnel_heartbeat_interval: float = c.option(c.positive_float, 30.0)
    log_level: str = c.option(c.choice("debug", "info", "warning", "error"), "info")

    @property
    def source_allow_list(self) -> tuple[str, ...]:
        if self.allowed_sources is not None:
            return self.allowed_sources
        return () if self.publish == "kubernetes" else LOOPBACK

    def check(self) -> None:
        """Cross-field rules, reported with the same one-line errors as single values."""
        if self.auth == "token-file" and self.token_file is None:
            raise c.ConfigError(
                "JOBTUNNEL_TOKEN_FILE (token_file) is required with auth=token-file"
            )
        if self.max_refused_sources > 64:
            raise c.ConfigError(
                "JOBTUNNEL_MAX_REFUSED_SOURCES (max_refused_sources): at most 64 (the Tunnel "
                f"status holds no more), got {self.max_refused_sources}"
            )
        if self.auth == "hub" and not self.hub_api_url:
            raise c.ConfigError("JOBTUNNEL_HUB_API_URL (hub_api_url) is required with auth=hub")
        if self.publish == "kubernetes":
            for key in ("namespace", "pod_name", "pod_ip"):
                if not getattr(self, key):
                    raise c.ConfigError(
                        f"JOBTUNNEL_{key.upper()} ({key}) is required with publish=kubernetes"
                    )
        if self.takeover_challenge_timeout >= self.login_timeout:
            # The claimant's hello waits for the challenge, all within its login timeout.
            raise c.ConfigError(
                f"JOBTUNNEL_TAKEOVER_CHALLENGE_TIMEOUT (takeover_challenge_timeout): "
                f"{self.takeover_challenge_timeout:g}s must be below "
                f"JOBTUNNEL_LOGIN_TIMEOUT (login_timeout, {self.login_timeout:g}s)"
            )
        if self.hub_api_url and not self.hub_api_url.startswith(("https://", "http://")):
            raise c.ConfigError(
                f"JOBTUNNEL_HUB_API_URL (hub_api_url): expected an http(s):// URL, "
                f"got {self.hub_api_url!r}"
            )

"""The agent's settings: every option a TOML key and an environment variable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared import config as c


@dataclass(frozen=True, slots=True)
class AgentSettings:
    forwarder: c.HostPort = c.option(c.host_port)
    user: str = c.option(c.string, env=("JOBTUNNEL_USER", "JUPYTERHUB_USER"))
    # The token never comes from argv: from the hub's own variable, or a file.
    token: c.Secret | None = c.option(c.secret, None, env="JUPYTERHUB_API_TOKEN")
    token_file: Path | None = c.option(c.optional_path, None)
    host_key_fingerprint: str | None = c.option(c.fingerprint, None)
    known_hosts: Path | None = c.option(c.optional_path, None)
    insecure_skip_host_key_check: bool = c.option(c.boolean, False)
    services: tuple[tuple[str, int], ...] = c.option(
        c.services, (("scheduler", 8786), ("dashboard", 8787))
    )
    service_host: str = c.option(c.string, "127.0.0.1")
    private_ip: str | None = c.option(c.optional_string, None)
    http: c.HostPort | None = c.option(c.optional_listen_address, None)
    pod_namespace: str | None = c.option(c.optional_string, None)
    pod_name: str | None = c.option(c.optional_string, None)
    pod_uid: str | None = c.option(c.optional_string, None)
    service_wait_timeout: float = c.option(c.positive_float, 120.0)
    connect_timeout: float = c.option(c.positive_float, 15.0)
    keepalive_interval: float = c.option(c.positive_float, 15.0)
    backoff_initial: float = c.option(c.positive_float, 0.5)
    backoff_max: float = c.option(c.positive_float, 30.0)
    #: Retries while another session holds our identity back off up to this (it may last).
    identity_conflict_backoff_max: float = c.option(c.positive_float, 60.0)
    bye_timeout: float = c.option(c.positive_float, 3.0)
    log_level: str = c.option(c.choice("debug", "info", "warning", "error"), "info")

    def check(self) -> None:
        """Cross-field rules; also reads the token once so a bad file stops the start."""
        if self.token is None and self.token_file is None:
            raise c.ConfigError(
                "JUPYTERHUB_API_TOKEN or JOBTUNNEL_TOKEN_FILE (token_file) must be set"
            )
        if (
            self.host_key_fingerprint is None
            and self.known_hosts is None
            and not self.insecure_skip_host_key_check
        ):
            raise c.ConfigError(
                "JOBTUNNEL_HOST_KEY_FINGERPRINT or JOBTUNNEL_KNOWN_HOSTS must be set "
                "(a job never talks to an unverified forwarder; "
                "JOBTUNNEL_INSECURE_SKIP_HOST_KEY_CHECK=true exists for demos only)"
            )
        if self.host_key_fingerprint is None and self.known_hosts is not None:
            # Otherwise asyncssh fails on every connection attempt and the agent retries forever.
            try:
                self.known_hosts.read_bytes()
            except OSError as exc:
                raise c.ConfigError(
                    f"JOBTUNNEL_KNOWN_HOSTS (known_hosts): cannot read {self.known_hosts}: "
                    f"{exc.strerror or exc}"
                ) from None
        pod = (self.pod_namespace, self.pod_name, self.pod_uid)
        if any(pod) and not all(pod):
            raise c.ConfigError(
                "JOBTUNNEL_POD_NAMESPACE, JOBTUNNEL_POD_NAME and JOBTUNNEL_POD_UID "
                "must be set together (a pod claim needs all three)"
            )
        self.read_token()

    def read_token(self) -> c.Secret:
        """The token, from the environment or the first non-comment line of the file."""
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        try:
            text = self.token_file.read_text()
        except OSError as exc:
            raise c.ConfigError(
                f"JOBTUNNEL_TOKEN_FILE (token_file): cannot read {self.token_file}: "
                f"{exc.strerror or exc}"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise c.ConfigError(f"JOBTUNNEL_TOKEN_FILE (token_file): {self.token_file} is empty")
        return c.Secret(lines[0])

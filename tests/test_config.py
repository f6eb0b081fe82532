"""Configuration: TOML + environment, and one clear line naming the key when it is wrong.

The console scripts run as real subprocesses with bad settings: they must exit 2
with a single stderr line that names the option, and never print the token.
The parsers and the loader are also tested in-process.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons.agent.settings import AgentSettings
from daemons.forwarder.settings import ForwarderSettings
from shared import config as c
from tests.harness import base_env

BIN = Path(sys.executable).parent
AGENT = str(BIN / "jobtunnel-agent")
FORWARDER = str(BIN / "jobtunnel-forwarder")
TOKEN = "tok-9f3c1e7ab2d54c08a1e6-DISTINCTIVE"
FINGERPRINT = "SHA256:" + "A" * 43


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=base_env() | env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2, one stderr line, naming every one of ``names``; nothing on stdout."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    line = lines[0]
    assert "configuration error" in line
    for name in names:
        assert name in line, line
    assert TOKEN not in result.stderr + result.stdout
    return line


@pytest.fixture
def agent_env() -> dict[str, str]:
    return {
        "JOBTUNNEL_FORWARDER": "127.0.0.1:1",
        "JOBTUNNEL_USER": "alice",
        "JUPYTERHUB_API_TOKEN": TOKEN,
        "JOBTUNNEL_HOST_KEY_FINGERPRINT": FINGERPRINT,
    }


@pytest.fixture
def forwarder_env(tmp_path: Path) -> dict[str, str]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    return {
        "JOBTUNNEL_LISTEN": "127.0.0.1:0",
        "JOBTUNNEL_HTTP": "127.0.0.1:0",
        "JOBTUNNEL_HOST_KEY": str(tmp_path / "host_key"),
        "JOBTUNNEL_TOKEN_FILE": str(tokens),
        # Present in every forwarder case: no error message may echo it.
        "JUPYTERHUB_API_TOKEN": TOKEN,
    }


# The forwarder's console script.


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("JOBTUNNEL_PORT_RANGE", "40999-40000", "LOW <= HIGH"),
        ("JOBTUNNEL_PORT_RANGE", "abc", "LOW-HIGH"),
        ("JOBTUNNEL_PORT_RANGE", "0-10", "LOW in 1..65535"),
        ("JOBTUNNEL_LISTEN", "nohost", "HOST:PORT"),
        ("JOBTUNNEL_LISTEN", "host:99999", "99999"),
        ("JOBTUNNEL_LISTEN", "[not-v6]:22", "IPv6"),
        ("JOBTUNNEL_HTTP", ":8080", "with a host"),
        ("JOBTUNNEL_AUTH", "ldap", "ldap"),
        ("JOBTUNNEL_HEARTBEAT_INTERVAL", "-1", "positive"),
        ("JOBTUNNEL_TAKEOVER_CHALLENGE_TIMEOUT", "0", "positive"),
        ("JOBTUNNEL_MAX_SESSIONS_PER_USER", "many", "positive integer"),
        ("JOBTUNNEL_HUB_VERIFY_TLS", "maybe", "true or false"),
        ("JOBTUNNEL_ALLOWED_SERVICES", "Scheduler", "lowercase"),
        ("JOBTUNNEL_LOG_LEVEL", "loud", "debug"),
    ],
)
def test_forwarder_bad_value(
    forwarder_env: dict[str, str], tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    result = run([FORWARDER], forwarder_env | {variable: value}, tmp_path)
    assert_config_error(result, variable, expected)


def test_forwarder_hub_auth_needs_url(forwarder_env: dict[str, str], tmp_path: Path) -> None:
    result = run([FORWARDER], forwarder_env | {"JOBTUNNEL_AUTH": "hub"}, tmp_path)
    assert_config_error(result, "JOBTUNNEL_HUB_API_URL")


def test_forwarder_takeover_challenge_fits_the_login_timeout(
    forwarder_env: dict[str, str], tmp_path: Path
) -> None:
    env = {"JOBTUNNEL_TAKEOVER_CHALLENGE_TIMEOUT": "30", "JOBTUNNEL_LOGIN_TIMEOUT": "10"}
    result = run([FORWARDER], forwarder_env | env, tmp_path)
    assert_config_error(result, "JOBTUNNEL_TAKEOVER_CHALLENGE_TIMEOUT", "JOBTUNNEL_LOGIN_TIMEOUT")


def test_forwarder_token_file_auth_needs_file(
    forwarder_env: dict[str, str], tmp_path: Path
) -> None:
    del forwarder_env["JOBTUNNEL_TOKEN_FILE"]
    result = run([FORWARDER], forwarder_env, tmp_path)
    assert_config_error(result, "JOBTUNNEL_TOKEN_FILE")


def test_forwarder_unknown_toml_key(forwarder_env: dict[str, str], tmp_path: Path) -> None:
    toml = tmp_path / "forwarder.toml"
    toml.write_text('listn = "127.0.0.1:31022"\n')
    result = run([FORWARDER, "--config", str(toml)], forwarder_env, tmp_path)
    line = assert_config_error(result, "'listn'", str(toml))
    assert "listen" in line  # the known keys are offered


def test_forwarder_invalid_toml(forwarder_env: dict[str, str], tmp_path: Path) -> None:
    toml = tmp_path / "forwarder.toml"
    toml.write_text('listen = "127.0.0.1:31022\n')  # unterminated string
    result = run([FORWARDER, "--config", str(toml)], forwarder_env, tmp_path)
    assert_config_error(result, str(toml), "not valid TOML", "line 1")


def test_forwarder_missing_config_file(forwarder_env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run([FORWARDER, "--config", str(missing)], forwarder_env, tmp_path)
    assert_config_error(result, str(missing), "No such file")


def test_forwarder_bad_toml_value_names_key(forwarder_env: dict[str, str], tmp_path: Path) -> None:
    toml = tmp_path / "forwarder.toml"
    toml.write_text('port_range = "9-1"\n')
    del forwarder_env["JOBTUNNEL_LISTEN"]
    result = run([FORWARDER, "--config", str(toml)], forwarder_env, tmp_path)
    assert_config_error(result, f"{toml}: port_range", "LOW <= HIGH")


def test_forwarder_wrong_toml_type_names_key(forwarder_env: dict[str, str], tmp_path: Path) -> None:
    toml = tmp_path / "forwarder.toml"
    toml.write_text("drain_timeout = [1, 2]\n")
    result = run([FORWARDER, "--config", str(toml)], forwarder_env, tmp_path)
    assert_config_error(result, "drain_timeout", "[1, 2]")


# The agent's console script.


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("JOBTUNNEL_SERVICES", "scheduler=abc", "'abc'"),
        ("JOBTUNNEL_SERVICES", "scheduler", "NAME=PORT"),
        ("JOBTUNNEL_SERVICES", "=8786", "with a name"),
        ("JOBTUNNEL_SERVICES", "scheduler=1,scheduler=2", "twice"),
        ("JOBTUNNEL_SERVICES", ",", "at least one"),
        ("JOBTUNNEL_HOST_KEY_FINGERPRINT", "garbage", "SHA256:"),
        ("JOBTUNNEL_HOST_KEY_FINGERPRINT", "SHA256:tooshort", "43 base64"),
        ("JOBTUNNEL_FORWARDER", "forwarder.example.org", "HOST:PORT"),
        ("JOBTUNNEL_FORWARDER", "forwarder.example.org:0", "1..65535"),
        ("JOBTUNNEL_BACKOFF_MAX", "0", "positive"),
        ("JOBTUNNEL_IDENTITY_CONFLICT_BACKOFF_MAX", "-5", "positive"),
        ("JOBTUNNEL_HTTP", "nohost", "HOST:PORT"),
        ("JOBTUNNEL_INSECURE_SKIP_HOST_KEY_CHECK", "perhaps", "true or false"),
    ],
)
def test_agent_bad_value(
    agent_env: dict[str, str], tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    result = run([AGENT, "--", "true"], agent_env | {variable: value}, tmp_path)
    assert_config_error(result, variable, expected)


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("JOBTUNNEL_FORWARDER", ["JOBTUNNEL_FORWARDER", "required"]),
        ("JOBTUNNEL_USER", ["JOBTUNNEL_USER", "required"]),
        ("JUPYTERHUB_API_TOKEN", ["JUPYTERHUB_API_TOKEN", "JOBTUNNEL_TOKEN_FILE"]),
        ("JOBTUNNEL_HOST_KEY_FINGERPRINT", ["JOBTUNNEL_HOST_KEY_FINGERPRINT", "KNOWN_HOSTS"]),
    ],
)
def test_agent_missing_required(
    agent_env: dict[str, str], tmp_path: Path, missing: str, expected: list[str]
) -> None:
    del agent_env[missing]
    result = run([AGENT, "--", "true"], agent_env, tmp_path)
    assert_config_error(result, *expected)


def test_agent_user_from_jupyterhub_user(agent_env: dict[str, str]) -> None:
    del agent_env["JOBTUNNEL_USER"]
    settings = c.load(AgentSettings, environ=agent_env | {"JUPYTERHUB_USER": "bob"})
    assert settings.user == "bob"


def test_agent_unreadable_token_file(agent_env: dict[str, str], tmp_path: Path) -> None:
    del agent_env["JUPYTERHUB_API_TOKEN"]
    missing = tmp_path / "no-token"
    result = run(
        [AGENT, "--", "true"], agent_env | {"JOBTUNNEL_TOKEN_FILE": str(missing)}, tmp_path
    )
    assert_config_error(result, "JOBTUNNEL_TOKEN_FILE", str(missing))


def test_agent_empty_token_file(agent_env: dict[str, str], tmp_path: Path) -> None:
    del agent_env["JUPYTERHUB_API_TOKEN"]
    empty = tmp_path / "token"
    empty.write_text("# nothing but a comment\n\n")
    result = run([AGENT, "--", "true"], agent_env | {"JOBTUNNEL_TOKEN_FILE": str(empty)}, tmp_path)
    assert_config_error(result, "JOBTUNNEL_TOKEN_FILE", "empty")


def test_agent_unreadable_known_hosts(agent_env: dict[str, str], tmp_path: Path) -> None:
    del agent_env["JOBTUNNEL_HOST_KEY_FINGERPRINT"]
    missing = tmp_path / "known_hosts"
    result = run(
        [AGENT, "--", "true"], agent_env | {"JOBTUNNEL_KNOWN_HOSTS": str(missing)}, tmp_path
    )
    assert_config_error(result, "JOBTUNNEL_KNOWN_HOSTS", str(missing))


def test_agent_partial_pod_claim(agent_env: dict[str, str], tmp_path: Path) -> None:
    result = run([AGENT, "--", "true"], agent_env | {"JOBTUNNEL_POD_NAME": "x"}, tmp_path)
    assert_config_error(result, "JOBTUNNEL_POD_UID")


def test_agent_unknown_toml_key(agent_env: dict[str, str], tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('forwardr = "forwarder.example.org:31022"\n')
    result = run([AGENT, "--config", str(toml), "--", "true"], agent_env, tmp_path)
    assert_config_error(result, "'forwardr'")


def test_agent_token_never_in_errors(tmp_path: Path) -> None:
    """The token sits in the environment and in a TOML file; errors about others hide it."""
    toml = tmp_path / "agent.toml"
    toml.write_text(f'token = "{TOKEN}"\nforwarder = "nohost"\n')
    env = {"JOBTUNNEL_USER": "alice", "JOBTUNNEL_HOST_KEY_FINGERPRINT": FINGERPRINT}
    for argv, extra in [
        ([AGENT, "--config", str(toml)], {}),
        ([AGENT, "--config", str(toml)], {"JUPYTERHUB_API_TOKEN": TOKEN}),
        ([AGENT], {"JUPYTERHUB_API_TOKEN": TOKEN, "JOBTUNNEL_FORWARDER": TOKEN}),
        ([AGENT], {"JUPYTERHUB_API_TOKEN": TOKEN, "JOBTUNNEL_SERVICES": "scheduler=x"}),
        ([AGENT], {"JUPYTERHUB_API_TOKEN": f"{TOKEN}\n", "JOBTUNNEL_FORWARDER": "h:1x"}),
    ]:
        result = run(argv, env | extra, tmp_path)
        assert result.returncode == 2, result.stderr
        if extra.get("JOBTUNNEL_FORWARDER") == TOKEN:
            # A value that *is* the token, pasted into the wrong variable, is echoed as the
            # bad value of that variable: the one place it may appear, and only there.
            continue
        assert TOKEN not in result.stderr + result.stdout, result.stderr


# In-process: the loader.


@dataclass(frozen=True, slots=True)
class Example:
    name: str = c.option(c.string, env=("JOBTUNNEL_NAME", "OTHER_NAME"))
    listen: c.HostPort = c.option(c.listen_address, c.HostPort("0.0.0.0", 31022))
    token: c.Secret | None = c.option(c.secret, None, env="EXAMPLE_TOKEN")
    enabled: bool = c.option(c.boolean, False)
    ports: c.PortRange = c.option(c.port_range, c.PortRange(40000, 40999))


def test_environment_wins_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "example.toml"
    toml.write_text('listen = "10.0.0.1:2222"\nname = "from-file"\nenabled = true\n')
    from_file = c.load(Example, config_file=toml, environ={})
    assert from_file == Example(name="from-file", listen=c.HostPort("10.0.0.1", 2222), enabled=True)
    both = c.load(
        Example,
        config_file=toml,
        environ={"JOBTUNNEL_LISTEN": "[::1]:22", "JOBTUNNEL_NAME": "from-env"},
    )
    assert both.listen == c.HostPort("::1", 22)
    assert both.name == "from-env"
    assert both.enabled is True  # not overridden: the file's value stays


def test_environment_alternatives_first_wins() -> None:
    env = {"OTHER_NAME": "second", "JOBTUNNEL_NAME": "first"}
    assert c.load(Example, environ=env).name == "first"
    assert c.load(Example, environ={"OTHER_NAME": "second"}).name == "second"


def test_missing_required_names_variable_and_key() -> None:
    with pytest.raises(c.ConfigError, match=r"^JOBTUNNEL_NAME \(name\) is required but not set$"):
        c.load(Example, environ={})


def test_bad_environment_value_names_variable() -> None:
    with pytest.raises(c.ConfigError, match=r"^JOBTUNNEL_PORTS: expected LOW <= HIGH"):
        c.load(Example, environ={"JOBTUNNEL_NAME": "x", "JOBTUNNEL_PORTS": "9-1"})


def test_bad_file_value_names_file_and_key(tmp_path: Path) -> None:
    toml = tmp_path / "example.toml"
    toml.write_text('name = "x"\nenabled = "sometimes"\n')
    with pytest.raises(c.ConfigError) as info:
        c.load(Example, config_file=toml, environ={})
    assert str(info.value).startswith(f"{toml}: enabled: expected true or false")
    assert "\n" not in str(info.value)


def test_secret_never_shows() -> None:
    settings = c.load(Example, environ={"JOBTUNNEL_NAME": "x", "EXAMPLE_TOKEN": TOKEN})
    assert settings.token is not None
    assert settings.token.reveal() == TOKEN
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings.token)
    with pytest.raises(c.ConfigError, match="non-empty secret") as info:
        c.load(Example, environ={"JOBTUNNEL_NAME": "x", "EXAMPLE_TOKEN": "   "})
    assert "EXAMPLE_TOKEN" in str(info.value)


def test_unknown_environment_listed() -> None:
    env = {"JOBTUNNEL_NAME": "x", "JOBTUNNEL_LISTN": "h:1", "OTHER": "y"}
    assert c.unknown_environment(Example, env) == ["JOBTUNNEL_LISTN"]


def test_daemon_defaults_load_from_empty_environment(tmp_path: Path) -> None:
    settings = c.load(ForwarderSettings, environ={})
    assert settings.listen == c.HostPort("0.0.0.0", 31022)
    with pytest.raises(c.ConfigError, match="JOBTUNNEL_TOKEN_FILE"):
        settings.check()


# In-process: the parsers.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org:22", c.HostPort("example.org", 22)),
        ("  10.0.0.1:31022 ", c.HostPort("10.0.0.1", 31022)),
        ("[::1]:22", c.HostPort("::1", 22)),
        ("[2001:db8::7]:65535", c.HostPort("2001:db8::7", 65535)),
    ],
)
def test_host_port_accepts(text: str, expected: c.HostPort) -> None:
    assert c.host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    ["nohost", "host:", ":22", "host:0", "host:65536", "host:-1", "host:2x", "::1:22", "[::1]",
     "[host]:22", "a:b:c", ""],
)  # fmt: skip
def test_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        c.host_port(text)


def test_host_port_str_round_trips() -> None:
    for text in ["example.org:22", "[::1]:22", "[2001:db8::7]:8786"]:
        assert str(c.host_port(text)) == text
    assert c.listen_address("0.0.0.0:0") == c.HostPort("0.0.0.0", 0)
    assert c.optional_listen_address("") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("40000-40999", (40000, 40999, 1000)), (" 5 - 5 ", (5, 5, 1)), ("1-65535", (1, 65535, 65535))],
)
def test_port_range_accepts(text: str, expected: tuple[int, int, int]) -> None:
    r = c.port_range(text)
    assert (r.low, r.high, len(r)) == expected
    assert str(r) == text.replace(" ", "")


@pytest.mark.parametrize(
    "raw", ["40999-40000", "abc", "40000", "0-10", "1-65536", "a-b", "-1-5", 40000, "1-2-3"]
)
def test_port_range_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        c.port_range(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("scheduler=8786,dashboard=8787", (("scheduler", 8786), ("dashboard", 8787))),
        (" scheduler = 8786 , ", (("scheduler", 8786),)),
        ({"scheduler": 8786, "dashboard": 8787}, (("scheduler", 8786), ("dashboard", 8787))),
    ],
)
def test_services_accepts(raw: object, expected: tuple[tuple[str, int], ...]) -> None:
    assert c.services(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["scheduler=abc", "scheduler", "=8786", "Scheduler=1", "scheduler=0", "scheduler=70000",
     "scheduler=1,scheduler=2", "", ",", {}, {"scheduler": True}, {"": 1}, ["scheduler=1"]],
)  # fmt: skip
def test_services_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match=r"expected|twice"):
        c.services(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(True, True), (False, False), ("true", True), ("YES", True), ("on", True), ("1", True),
     ("false", False), ("no", False), ("Off", False), ("0", False), ("", False)],
)  # fmt: skip
def test_boolean_accepts(raw: object, expected: bool) -> None:
    assert c.boolean(raw) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "truee", 1.5, None, [True]])
def test_boolean_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        c.boolean(raw)


def test_fingerprint_parser() -> None:
    assert c.fingerprint(FINGERPRINT + "=") == FINGERPRINT
    assert c.fingerprint("") is None
    for bad in ["garbage", "SHA256:short", "MD5:" + "A" * 43, "SHA256:" + "!" * 43]:
        with pytest.raises(ValueError, match="SHA256"):
            c.fingerprint(bad)


def test_numbers() -> None:
    assert c.positive_float("0.5") == 0.5
    assert c.positive_int(" 7 ") == 7
    for bad in ["0", "-1", "nan", "inf", "x", True]:
        with pytest.raises(ValueError, match="expected"):
            c.positive_float(bad)
    for bad in ["0", "1.5", "x", True]:
        with pytest.raises(ValueError, match="expected"):
            c.positive_int(bad)


def test_name_list() -> None:
    assert c.name_list("scheduler, dashboard") == ("scheduler", "dashboard")
    assert c.name_list(["scheduler"]) == ("scheduler",)
    with pytest.raises(ValueError, match="lowercase"):
        c.name_list("Scheduler")

"""The example configurations under configs/ load with the real loader."""

from __future__ import annotations

from pathlib import Path

from daemons.agent.settings import AgentSettings
from daemons.forwarder.settings import ForwarderSettings
from shared import config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_forwarder_example_loads() -> None:
    settings = config.load(ForwarderSettings, config_file=CONFIGS / "forwarder.toml", environ={})
    settings.check()
    assert settings.listen.port == 31022
    assert settings.allowed_services == ("scheduler", "dashboard")


def test_agent_example_loads(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token-from-the-job-wrapper\n")
    settings = config.load(
        AgentSettings,
        config_file=CONFIGS / "agent.toml",
        environ={"JOBTUNNEL_TOKEN_FILE": str(token)},
    )
    settings.check()
    assert settings.services == (("scheduler", 8786), ("dashboard", 8787))
    assert settings.host_key_fingerprint is not None

"""The runtime server asks for the recipe whose launcher the client's command runs."""

from __future__ import annotations

from imagefarm.runtime.errors import NoPrebuiltImage
from imagefarm.runtime.resolver import recipe_for_command

V0 = ["/openhands/micromamba/bin/micromamba", "run", "-n", "openhands", "python", "-u", "-m",
      "openhands.runtime.action_execution_server", "60000", "--working-dir", "/testbed",
      "--plugins", "agent_skills", "--username", "root", "--user-id", "0"]


def test_v0_command_asks_for_the_v0_recipe_and_the_agent_server_for_the_default(settings) -> None:
    assert recipe_for_command(settings, V0) == "v0"
    assert recipe_for_command(settings, V0[:4] + ["poetry", "run"] + V0[4:]) == "v0"  # openhands-ai 0.59
    assert recipe_for_command(settings, ["/usr/local/bin/openhands-agent-server", "--port", "60000"]) is None
    assert recipe_for_command(settings, ["/agent-server/.venv/bin/python", "-m", "openhands.agent_server",
                                         "--port", "60000"]) is None
    assert recipe_for_command(settings, []) is None


def test_the_404_names_the_recipe_and_how_to_build_it() -> None:
    msg = str(NoPrebuiltImage("127.0.0.1:5000/r2e/x:1", "127.0.0.1:5000/r2e/x:1", "127.0.0.1:5000/prebuilt",
                              recipe="v0"))
    assert msg.startswith("no prebuilt image of recipe v0 for 127.0.0.1:5000/r2e/x:1 under 127.0.0.1:5000/prebuilt")
    assert "imagefarm derive 127.0.0.1:5000/r2e/x:1 --to 127.0.0.1:5000/prebuilt --recipe v0" in msg
    assert str(NoPrebuiltImage("b", "b", "t")).startswith("no prebuilt agent-server image for b under t")

"""The shell entry points: env.sh leaves a robot's DDS settings alone; loopback.sh (tests, demo, CI) confines them."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sourced(*scripts: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ROS_AUTOMATIC_DISCOVERY_RANGE",
                                                            "FASTDDS_DEFAULT_PROFILES_FILE")}
    cmd = "".join(f"source {ROOT / 'scripts' / s}; " for s in scripts)
    out = subprocess.run(["bash", "-c", cmd + "echo R=${ROS_AUTOMATIC_DISCOVERY_RANGE-unset}; "
                          "echo F=${FASTDDS_DEFAULT_PROFILES_FILE-unset}; echo O=$HF_HUB_OFFLINE"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.split())


def test_env_sh_keeps_the_users_dds_settings():
    got = _sourced("env.sh")
    assert got["R"] == "unset" and got["F"] == "unset" and got["O"] == "1"


def test_loopback_sh_confines_tests_demo_and_ci():
    got = _sourced("env.sh", "loopback.sh")
    assert got["R"] == "LOCALHOST" and got["F"].endswith("config/fastdds_localhost.xml")
    for script in ("test.sh", "demo.sh"):
        assert "loopback.sh" in (ROOT / "scripts" / script).read_text(), script

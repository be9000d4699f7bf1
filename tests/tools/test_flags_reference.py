"""docs/flags.md is generated from the argparse definitions and must match them."""

import subprocess
import sys

from tests.conftest import REPO


def test_flags_reference_is_up_to_date():
    generated = subprocess.run([sys.executable, str(REPO / "tools" / "flags_reference.py")],
                               capture_output=True, text=True, check=True, timeout=60).stdout
    assert (REPO / "docs" / "flags.md").read_text() == generated, (
        "docs/flags.md is stale: run python tools/flags_reference.py --update")


def test_every_help_flag_is_documented():
    help_text = subprocess.run([sys.executable, str(REPO / "pretrain_moe.py"), "--help"],
                               capture_output=True, text=True, check=True, timeout=60).stdout
    usage = help_text.split("\n\n", 1)[0]  # the usage block lists every flag once
    flags = {word.strip("[],()") for word in usage.split() if word.lstrip("[").startswith("--")}
    flags = {f.lstrip("[") for f in flags} - {"--help"}
    documented = (REPO / "docs" / "flags.md").read_text()
    assert len(flags) > 60
    assert all(f"`{flag}`" in documented for flag in flags), sorted(
        f for f in flags if f"`{f}`" not in documented)

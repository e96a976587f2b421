"""How a user installs one of this package's extras; every "not installed" message builds its hint
here, so the command is written the same way everywhere."""

from __future__ import annotations


def extra_install_command(extra: str) -> str:
    """The command that installs `extra` (one of pyproject.toml's optional-dependency groups). The
    distribution is installed from a clone (it is not on PyPI), so the command names the clone."""
    return f"pip install -e '<moe-backend clone>[{extra}]'"

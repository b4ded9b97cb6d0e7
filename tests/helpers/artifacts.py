"""Where tests leave what a person should look at after a run (screenshots, logs)."""

from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

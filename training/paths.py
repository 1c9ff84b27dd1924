"""Where the pack keeps its files (one home, so moving a module never moves a default path)."""
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
REFERENCE_DIR = PACK_DIR / "models" / "reference"  # the reference Dash and its feature classifier
DOT_DIR = PACK_DIR / "models" / "dot_models"  # the committed reference Dots
REPORTS_DIR = PACK_DIR / "reports"
RUNS_DIR = PACK_DIR / "runs"  # training checkpoints and caches (ignored by git)

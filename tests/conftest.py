import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests never talk to wandb's servers; runs that want wandb offline set it explicitly.
os.environ.setdefault("WANDB_MODE", "disabled")
# Tests share one tokenized copy of the builtin corpus per session instead of the user's cache.
os.environ.setdefault("DIST_LLAMA_CACHE", str(ROOT / ".cache" / "test-data"))

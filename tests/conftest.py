import os
import sys
from pathlib import Path

# Test helpers live beside the tests (tests/<area>/helpers.py); make them importable as `helpers`.
sys.path.insert(0, str(Path(__file__).parent / "training"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

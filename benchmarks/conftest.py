import sys
from pathlib import Path

# run from anywhere: import zsq_fast from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

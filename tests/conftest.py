import os
import sys

# tests import their helpers (hf_reference.py) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))

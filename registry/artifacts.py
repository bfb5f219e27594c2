"""Names of a registered version's files."""

from pathlib import Path

__all__ = ["STATE_FILE", "SPEC_FILE", "PYFUNC_SCRIPT"]

STATE_FILE = "state_dict.pt"  # tensors only, loaded with weights_only=True
SPEC_FILE = "spec.json"  # imaging.spec.ModelSpec
PYFUNC_SCRIPT = Path(__file__).with_name("pyfunc_model.py")

"""Names of a registered version's files."""

from pathlib import Path

__all__ = ["STATE_FILE", "SPEC_FILE", "PYFUNC_SCRIPT", "dossier_artifact_dir"]

STATE_FILE = "state_dict.pt"  # tensors only, loaded with weights_only=True
SPEC_FILE = "spec.json"  # imaging.spec.ModelSpec
PYFUNC_SCRIPT = Path(__file__).with_name("pyfunc_model.py")


def dossier_artifact_dir(version: int) -> str:
    """Where version ``version``'s dossier lies among its training run's artifacts."""
    return f"dossier/v{int(version)}"

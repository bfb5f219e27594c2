"""What the service sends out besides JSON: DICOM SEG objects, and STOW-RS to a PACS."""

from .seg import SegObject, build_seg
from .stow import StowError, StowNotConfiguredError, StowResult, StowTarget, store_seg, stow, target_from_settings

__all__ = ["SegObject", "build_seg", "StowError", "StowNotConfiguredError", "StowResult", "StowTarget", "stow", "store_seg", "target_from_settings"]

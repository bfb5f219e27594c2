"""fedseg: federated segmentation across hospitals. This package only assembles the CLI."""

__version__ = "0.1.0"

"""Lineage tags that satisfy the evidence the promotion gates always require.

The coordinator records which sites trained (``sites``) and each one's Dice of the published
model (``eval_sites``); a version without them fails the ``evaluated_sites`` gate and is never
promoted at publish time. Tests that publish by hand and expect a champion add these tags.
"""

from __future__ import annotations

import json


def evaluated(*sites: str, dice: float = 0.5, samples: int = 8) -> dict[str, str]:
    """``sites`` trained on ``samples`` slices each and every one evaluated the published model."""
    names = sites or ("site-a",)
    return {"sites": json.dumps({s: samples for s in names}),
            "eval_sites": json.dumps({s: dice for s in names})}

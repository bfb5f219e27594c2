"""Which state_dict entries belong to normalisation layers (FedBN-style local normalisation).

MONAI's U-Net names its norm layers ``...adn.N`` (``ADN`` block, ``N`` = norm), so a name
pattern such as ``.norm.`` finds nothing: the layers are found by module type instead.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Protocol

__all__ = ["norm_parameter_names", "split_norm", "HasNamedModules"]


class HasNamedModules(Protocol):
    def named_modules(self) -> Iterable[tuple[str, Any]]: ...


def _norm_types() -> tuple[type, ...]:
    from torch import nn  # local: aggregation stays importable without loading torch
    from torch.nn.modules.batchnorm import _NormBase  # BatchNorm*d and InstanceNorm*d

    return (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_parameter_names(state_dict_keys: Iterable[str], net: HasNamedModules) -> frozenset[str]:
    """The keys of ``state_dict_keys`` that are parameters or buffers of a normalisation layer.

    Parameters
    ----------
    state_dict_keys : Iterable[str]
        The keys of the model's state_dict (or of the ArrayRecord carrying it).
    net : torch.nn.Module
        The network those keys belong to (``imaging.model.build_unet(spec)``). Keys wrapped by
        Opacus (``_module.`` prefix) are matched too.

    Returns
    -------
    frozenset[str]
        For the default spec (instance norm, affine): the ``weight`` and ``bias`` of each
        ``...adn.N`` module, 12 keys out of 38; group norm gives the same names.
    """
    keys = list(state_dict_keys)
    types = _norm_types()
    prefixes = [f"{name}." for name, module in net.named_modules() if name and isinstance(module, types)]
    out = set()
    for key in keys:
        bare = key.removeprefix("_module.")
        if any(bare.startswith(p) and "." not in bare[len(p):] for p in prefixes):
            out.add(key)
    return frozenset(out)


def split_norm(
    arrays: Mapping[str, Any], names: Collection[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``arrays`` split into (shared, local-normalisation) entries, keys kept in order."""
    shared = {k: v for k, v in arrays.items() if k not in names}
    local = {k: v for k, v in arrays.items() if k in names}
    return shared, local

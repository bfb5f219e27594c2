"""Which state_dict entries belong to normalisation layers: defined in :mod:`imaging`, where
the sites (FedBN-style local normalisation) and the coordinator both find them."""

from imaging.norm_layers import HasNamedModules, norm_parameter_names, split_norm

__all__ = ["norm_parameter_names", "split_norm", "HasNamedModules"]

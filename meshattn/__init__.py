"""meshattn: a config-driven, sharded attention layer for JAX / Flax NNX.

The code lives in the top-level folders of the repository (configs/,
sharding/, layers/, kvcache/, scripts/), which the build maps to
``meshattn.configs``, ``meshattn.sharding``, ... Import from those.
"""

__version__ = "0.1.0"

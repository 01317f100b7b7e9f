"""Megatron-LTD.

NVIDIA's megatron-core installs ``megatron/core`` as a portion of a ``megatron`` namespace.
Our ``megatron`` is a regular package, which would hide that portion whenever ours is found
first (always, when running ``pretrain_gpt.py`` from the repository root): ``extend_path`` adds
every other ``megatron`` directory on ``sys.path`` to ours, so ``import megatron.core`` keeps
working in an environment that has both (its readers and converters next to our tools).
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

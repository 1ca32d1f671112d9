"""A minimal stand-in for ``torchvision``, just enough for opacus' shipped tests.

The real torchvision cannot be loaded beside this repository's CPU build of torch, and opacus' test files
import it at module level. This stand-in provides, with torchvision's signatures and semantics:

- ``torchvision.datasets.FakeData`` (random images, seeded per index, as PIL images);
- ``torchvision.transforms.{Compose, ToTensor, Normalize}``;
- ``torchvision.models.{resnet18, densenet121}`` (the architectures of He et al. 2016 and Huang et al.
  2017 as torchvision builds them, BatchNorm included; ``weights`` must be None: nothing is downloaded).

It is put on ``sys.path`` only by ``tests/test_opacus_suite.py`` for the pytest subprocess that runs
opacus' tests; nothing in ``adaptive_dp`` imports it.
"""

from . import datasets, models, transforms

__all__ = ["datasets", "models", "transforms"]

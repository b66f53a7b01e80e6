"""Test-only stand-in for the three torchvision transforms that ``sam2.utils.transforms``
imports (torchvision is not a dependency of this project). Put ``tests/support/torchvision_stub`` on
``sys.path`` to use it; never installed, never imported by the product."""

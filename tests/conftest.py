"""Test set-up shared by every test folder.

The suite runs on CPU with 8 fake host devices so that sharding is exercised
without accelerators; the flag must be set before JAX initialises its backend.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Shared helpers (tests/helpers/...) are imported as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

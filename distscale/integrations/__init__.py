"""Framework integrations: each makes one training framework use a distscale GradScaler.

- :mod:`distscale.integrations.accelerate`: Hugging Face accelerate.
- :mod:`distscale.integrations.transformers`: the transformers ``Trainer`` (through its
  accelerator).
- :mod:`distscale.integrations.lightning`: precision plugins for the Lightning Trainer and Fabric.

Each module imports its framework lazily and says which extra installs it. They use distscale's
public API only (an import-linter contract checks it).
"""

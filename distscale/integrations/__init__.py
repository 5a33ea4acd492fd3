"""Framework integrations: each makes one training framework use a distscale GradScaler.

- :mod:`distscale.integrations.accelerate`: Hugging Face accelerate (and the transformers
  ``Trainer``, which trains through it).

Each module imports its framework lazily and says which extra installs it. They use distscale's
public API only (an import-linter contract checks it).
"""

"""Data: sources of records (the synthetic world, local files, the TFDS catalog) and grain loaders."""

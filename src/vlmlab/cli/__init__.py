"""The `vlmlab` command line: thin wrappers over the public API (`vlmlab.load`)."""

"""Runner glue: config loading, compat patches, hooks, loops, model wrappers."""

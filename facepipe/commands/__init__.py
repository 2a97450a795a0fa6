"""Click commands, one module each; :mod:`facepipe.cli` registers them lazily."""

"""DMS build pipeline: retrofit a model with Dynamic Memory Sparsification, then evaluate, convert,
build, package and serve it."""

"""DMS build pipeline: retrofit a model with Dynamic Memory Sparsification, evaluate, convert, build, serve."""

"""repfuse: fuse re-parameterizable train-time branches into one conv, from dataflow alone."""

__version__ = "0.1.0"

"""The HTTP service and command line. Imports go service -> models -> kernels."""

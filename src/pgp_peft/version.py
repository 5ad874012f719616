"""The package version (its own module, so modules that record it need not import the package)."""

__version__ = "0.2.0"

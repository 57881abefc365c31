"""The package version (a leaf module, so that modules inside the package need not import the package itself)."""

__version__ = "0.1.0"

"""The package version, in a module of its own so that the modules below the package's
__init__ (the SAE files, the formats) can record it without importing the package upward."""

__version__ = "0.1.0"

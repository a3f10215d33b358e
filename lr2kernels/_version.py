"""Single source of the package version; setup.py parses this file as text, so keep it one plain line."""

__version__ = "0.2.0.dev0"

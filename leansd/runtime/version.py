"""The version of leansd (recorded in exported folders and in each PNG's parameters)."""
__version__ = "0.1.0"

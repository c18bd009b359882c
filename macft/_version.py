"""macft's version, in a module of its own: whatever needs it imports this, never the package
(``macft/__init__.py`` lazily imports the whole API)."""

__version__ = "0.1.0"

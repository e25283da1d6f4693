"""Data engine for text-to-image training: the data side of the PixArt-alpha recipe."""

__version__ = "0.1.0"

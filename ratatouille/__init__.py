"""Model ratatouille: recycled auxiliary fine-tunings, averaged."""

__version__ = "0.1.0"

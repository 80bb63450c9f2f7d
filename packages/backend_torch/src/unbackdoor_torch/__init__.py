"""The Torch + PEFT backend of unbackdoor."""

__version__ = "0.1.0"

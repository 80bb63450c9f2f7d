"""An example unbackdoor plugin: one attack (``cf-suffix``) and one defense (``rare-word-filter``)."""

__version__ = "0.1.0"

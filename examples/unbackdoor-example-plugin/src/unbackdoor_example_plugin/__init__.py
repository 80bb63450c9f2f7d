"""An example unbackdoor plugin: an attack (``cf-suffix``), two defenses (``rare-word-filter``, ``abl``) and a loss
(``local-gradient-ascent``, which ``abl`` trains with)."""

__version__ = "0.2.0"

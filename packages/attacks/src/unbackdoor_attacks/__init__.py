"""Built-in backdoor attacks, registered through the ``unbackdoor`` entry-point group."""

__version__ = "0.1.0"

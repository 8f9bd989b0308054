"""neurokern's error for bad input. It subclasses ValueError, so `except ValueError` catches it."""


class NeurokernError(ValueError):
    """Bad input to neurokern: the message names the tensor, file or key and what was expected."""

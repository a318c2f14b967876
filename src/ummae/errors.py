"""The errors a user can cause, by kind. The command line prints these (and ``OSError``s) as
one ``error:`` line and exits 2 (3 for a run stopped by non-finite values); any other exception
is a bug in ummae and shows its traceback.

They subclass ``ValueError`` (``NonFiniteLossError``: ``RuntimeError``) so that code written
against the earlier single channel, ``except ValueError``, still catches them.
"""


class UmmaeError(Exception):
    """Base of the errors that mean "the input is wrong", not "the code is wrong"."""


class UsageError(UmmaeError, ValueError):
    """A bad option, option value, config file or combination of them."""


class CheckpointError(UmmaeError, ValueError):
    """A weights file that cannot be read, is not what it claims, or does not fit the model."""


class DataError(UmmaeError, ValueError):
    """A data set, image, annotation or label file that cannot be used."""


class NonFiniteLossError(UmmaeError, RuntimeError):
    """Training stopped: the loss or the weights became NaN / infinite (nothing bad was saved)."""

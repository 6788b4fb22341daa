"""Moving token rows to their experts and back: the :class:`~.protocol.Dispatcher` protocol, the
permutation every dispatcher shares, and the local and all-to-all implementations."""

"""For developers: the local stack behind ``make up`` and ``make demo``, and the
demo's assets, drawn offline."""

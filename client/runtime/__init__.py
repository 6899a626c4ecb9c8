"""The site process runtime: the long-lived process that owns the SuperNode and its warm worker."""

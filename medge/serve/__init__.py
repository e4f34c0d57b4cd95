"""Serving a bundle with other servers: ``triton`` (``medge export-triton``, a Triton model repository).

Nothing here is imported by ``import medge``; each module imports what it
needs when it is used.
"""

"""Errors of the sandbox nodes."""


class NodeError(RuntimeError):
    """A sandbox node failed to start, stop or answer; the message says where to look."""

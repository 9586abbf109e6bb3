"""The guest ABI: the command grammar and the shared-memory channel.

Standard library only: this package is what a middlebox VM carries (``mbctl``), and
what the host agent and the controller import so all three share one model.
"""

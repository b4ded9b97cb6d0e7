"""Checking strangers' work, below both the client and the relay: when two computations of a span
agree (`tolerance`), what a check claims and what proves a server wrong (`evidence`), and the local
referee that recomputes a span from a checkpoint (`referee`).
"""

"""The wire protocol both sides speak: RPC messages and their errors, tensors, step receipts, and
what a server signs for the relay (its registration, its requests).
"""

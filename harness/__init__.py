"""The local-swarm and fault harness: real processes on loopback, delayed links, chaos.

It sits above the server and the client (it starts the one and drives the other) and is used by the
demo, the tests and the benches; no server or client code imports it.
"""

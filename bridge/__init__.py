"""Bridges: how a server that nobody can dial (behind a home router's NAT) is reached anyway.

Why not libp2p's own circuit relay: in the p2pd that hivemind 1.1.12 bundles, a relayed connection
is "limited" and the daemon opens no application stream over it (identify works, every RPC hangs),
and it cannot hole-punch. So bridging happens one level up, over ordinary connections:

- An unreachable server dials a *bridge* (a bootstrap node or a reachable server) and keeps an
  *attach* stream open on it (`bridge.attached`). That connection went out through the server's
  NAT, so it is a plain two-way connection: the bridge can open streams to the server over it.
- A client (or a server pushing a step) that wants one of the server's RPCs opens a *circuit* on
  the bridge (`bridge.dial`): a small header names the server and the RPC; the bridge checks that
  the server is attached to it and that the RPC is one of the swarm's, opens that RPC on the server
  and copies bytes both ways, within its limits (`bridge.node`). Unary RPCs (info, echo) are carried
  as one request and one reply.
- *Dial-back* tells a server whether it is reachable: a node it asks opens a TCP connection to the
  address it sees the request come from, at the ports the server listens on. Only that address:
  nobody can make a bridge connect elsewhere.

"Bridge" is this side's one word (the coordinator is the `relay`); `bridge.frames` holds what all
three roles share.
"""

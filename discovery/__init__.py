"""Finding swarm peers without addresses to copy: libp2p mDNS on the LAN (`discovery.mdns`, which
imports only the standard library) and a DHT node's presence there (`discovery.presence`)."""

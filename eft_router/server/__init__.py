"""The network front: the gRPC router (servicer, server, authentication, metrics), its
settings, the message conversions, and the Python clients."""

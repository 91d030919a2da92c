"""The roles: the batch-first interface the engine calls, the role worker (one model and its
KV cache slots), and the backends that run workers in-process or as Ray Serve deployments."""

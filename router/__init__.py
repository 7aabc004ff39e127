"""Chunk-affinity request routing for Ray Serve.

The router hashes nothing: the ingress hashes each request's chunks and leading
text blocks (``mepic_ray.routing.build_routing``, with the engine's own
``mepic_ray.hashing``) and sends them in the payload as a ``RoutingInfo``, which
the router reads with ``mepic_ray.routing.routing_of``. Router modules import only
Ray, the standard library and the torch-free ``mepic_ray.routing`` (which loads
``mepic_ray.hashing``): never torch or the engine.
"""

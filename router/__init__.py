"""Chunk-affinity request routing for Ray Serve.

Imports only ``mepic_ray.hashing`` (never torch): the router hashes a request's
chunks exactly as the engine does, without loading a model.
"""

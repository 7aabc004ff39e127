"""Ray Serve deployments of the mepic-ray engine."""

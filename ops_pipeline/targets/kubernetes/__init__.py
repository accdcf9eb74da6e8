"""Kubernetes target: a Deployment rolled through the API server (client.py: the API resource)."""

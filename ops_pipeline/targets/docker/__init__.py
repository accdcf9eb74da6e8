"""Docker target: containers on one Docker Engine (engine.py: the API client, images, the registry), behind nginx."""

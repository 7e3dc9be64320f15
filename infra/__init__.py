"""Deployment files and their checker (`python -m infra.check`); not part of the heygem_ray package."""

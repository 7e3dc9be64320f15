"""heygem_ray: batch lip-sync rendering on Ray."""

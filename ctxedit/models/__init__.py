"""The networks: SD 1.x components (sd), inflation into a video UNet (inflate), the context adapter (adapter),
and the trained part that tuning saves (trained)."""

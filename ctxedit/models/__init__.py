"""The networks: what to load (spec) and how (sd: SD 1.x / 2.x components; formats: single files and refusals; lora;
embeddings), inflation into a video UNet (inflate), the context adapter (adapter), and the trained part that tuning
saves (trained)."""

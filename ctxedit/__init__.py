"""ctxedit: text-driven video editing with Tune-A-Video and ContextDiff on Stable Diffusion 1.x."""

__version__ = "0.1.0"

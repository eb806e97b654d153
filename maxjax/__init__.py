"""maxjax: an OpenAI-compatible model server on JAX/XLA."""

__version__ = "0.1.0"

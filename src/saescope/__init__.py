"""saescope: sparse autoencoders on every layer of a language model."""

__version__ = "0.1.0"

"""raygpt: nanoGPT's GPT training as a Ray Train job."""

__version__ = "0.1.0"

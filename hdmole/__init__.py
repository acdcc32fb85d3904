"""hdmole: HDMoLE for LLM-based ASR."""
__version__ = "0.1.0"

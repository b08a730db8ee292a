"""TurboQuant KV-cache compression for llama.cpp."""

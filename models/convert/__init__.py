"""Checkpoint conversion: HF safetensors (``safetensors_reader``, ``loader``: to NNX and Orbax) and GGUF (``gguf``)."""

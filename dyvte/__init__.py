"""dyvte: dynamic visual-token exit for Hugging Face multimodal LLMs."""

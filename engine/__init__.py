"""DALL-E engine: model, VAEs, tokenizers, checkpoints and sampling."""

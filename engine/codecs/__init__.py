"""What turns images and captions into tokens and back: the discrete VAEs (our own, taming's VQGAN, OpenAI's
dVAE) and the tokenizers."""

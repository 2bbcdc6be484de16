"""FlashCache for SGLang."""

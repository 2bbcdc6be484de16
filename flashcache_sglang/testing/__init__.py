"""Test support: model builders and a real SGLang server in a separate process."""

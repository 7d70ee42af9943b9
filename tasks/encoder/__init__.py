"""The sentence-encoder family (MiniLM): export, compression, evaluation."""

"""Offline tools a site runs on released weights: fine-tuning, embeddings, exports."""

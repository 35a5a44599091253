"""Storage tiers. A tier knows keys and bytes, not vLLM."""

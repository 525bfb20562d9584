"""The remote engine: speech from OpenAI-compatible servers (vLLM-Omni, or another instance)."""

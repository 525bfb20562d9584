"""OpenAI-compatible HTTP API (`/v1/audio/speech`), sharing the engine with the Wyoming server."""

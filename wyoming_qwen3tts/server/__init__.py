"""The Wyoming edge: events in, PCM audio out."""

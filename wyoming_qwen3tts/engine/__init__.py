"""The speech engine: owns the models, streams PCM."""

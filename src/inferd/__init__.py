"""inferd: serve AI models over gRPC with LocalAI's ``Backend`` protocol."""

__version__ = "0.1.0"

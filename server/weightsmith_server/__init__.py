"""weightsmith server: Keras models resident in memory, edited over gRPC."""

__version__ = "0.1.0"

"""edge-model-loader: serve object-detection models on IoT Edge devices, updated in place."""

__version__ = "0.1.0"

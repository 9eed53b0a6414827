"""IoT Hub: desired properties to a verified file in staging; events to reported properties."""

"""The signaling service: owns every call's state and the devices on WebSockets."""

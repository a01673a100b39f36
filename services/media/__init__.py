"""The media service: the SFU: forwards the callers' RTP packets without decoding them."""

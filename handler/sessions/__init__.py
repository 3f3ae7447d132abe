"""Live conversation sessions: protocol, codecs, transport and the conversation seam."""

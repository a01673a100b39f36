"""The notifications service: incoming- and missed-call notifications: inbox, live stream, push."""

"""The policy service: decides who may call whom, from settings and the platform's facts."""

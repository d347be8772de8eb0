"""auth: Issues and revokes sessions: JWT access tokens, rotating refresh tokens, JWKS."""

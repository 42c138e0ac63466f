"""How a generation's events reach clients: SSE, WebSocket, and the OpenAI-compatible API."""

"""The HTTP server: continuous batching (scheduler), the request schema (chat_request), the app (server), the page."""

"""Who may call what, and how often: API keys, scopes and allowlists, rate limits, and cheap checks on what a
client sends before the gateway spends work on it. Everything here runs on the event loop."""

"""The request flow: the active model, its worker pool, loading and warming up, hot swap."""

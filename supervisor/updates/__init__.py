"""The update flow: drop folder, pipeline, repository on disk, quarantine, events."""

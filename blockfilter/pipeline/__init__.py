"""The Celery layer: tasks, the collector, worker start-up checks, monitoring, replay."""
